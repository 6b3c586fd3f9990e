"""console.details: the parts a command narrates speak only with -v; their warnings always."""

from __future__ import annotations

import io
import logging

import pytest

from fedmerge import console


@pytest.fixture()
def stream():
    out = io.StringIO()
    yield out
    console.setup(console.NORMAL)


def test_details_hide_the_narrated_parts_info_lines_only_while_inside(stream):
    console.setup(console.NORMAL, stream=stream)
    server, client, demo = (logging.getLogger(n) for n in ("fedmerge.server.rounds", "fedmerge.client", "fedmerge.demo.run"))
    with console.details("fedmerge.server", "fedmerge.client"):
        server.info("round 1: merged 3 contributions")
        client.info("hospital-a: installed round 1")
        server.warning("round 1: rejected the contribution of hospital-b")
        demo.info("round 1: published iso_c alpha=0.75")
        logging.getLogger("fedmerge.serverless").info("not under fedmerge.server")
    server.info("after: shown again")
    assert stream.getvalue().splitlines() == [
        "warning: round 1: rejected the contribution of hospital-b",
        "round 1: published iso_c alpha=0.75",
        "not under fedmerge.server",
        "after: shown again",
    ]
    # the loggers themselves are untouched: another handler still gets every record
    assert server.level == logging.NOTSET and client.level == logging.NOTSET


def test_details_show_with_verbose(stream):
    console.setup(console.VERBOSE, stream=stream)
    with console.details("fedmerge.server"):
        logging.getLogger("fedmerge.server.rounds").info("round 1: merged")
    assert stream.getvalue().rstrip().endswith("INFO fedmerge.server.rounds: round 1: merged")


def test_nested_details_and_errors(stream):
    console.setup(console.NORMAL, stream=stream)
    log = logging.getLogger("fedmerge.server")
    with console.details("fedmerge.server"):
        with console.details("fedmerge.server"):
            log.info("hidden")
        log.info("still hidden: the outer one holds")
        with pytest.raises(RuntimeError):
            with console.details("fedmerge.client"):
                raise RuntimeError("boom")
        logging.getLogger("fedmerge.client").info("shown: the inner one ended with the error")
    assert stream.getvalue().splitlines() == ["shown: the inner one ended with the error"]
