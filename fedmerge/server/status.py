"""``fedmerge status --config FEDERATION.yaml``: the coordinator's rounds as the operator needs them.

Per round: each institution's state (contributed, rejected and why, dropped and at which stage,
late, excluded), the candidate selection (every candidate's score from every scorer, the rule's
value, which one was published and why, who did not score), the merge, the evaluation and the
gate's decision, and the publication (who installed it). Read from the round records the loop writes atomically, so it is safe to run
while rounds are in progress; ``--watch`` follows them until every round is done, ``--json``
prints the records for tools (one JSON document per refresh with ``--watch``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

from fedmerge.server.config import FederationConfig
from fedmerge.server.ledger import RoundLedger
from fedmerge.server.record import RoundRecord, RoundStatus


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "status",
        help="the federation's rounds: each institution's state, the merge, the evaluation, the gate, the publication",
        description="Show the rounds the coordinator of --config ran or is running, from its state folder.",
    )
    p.add_argument("--config", required=True, metavar="FEDERATION_YAML", help="the federation config")
    p.add_argument("--json", action="store_true", help="print the round records as JSON")
    p.add_argument("--watch", action="store_true", help="refresh until every round is done (Ctrl-C to stop)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes with --watch (default 5)")
    p.add_argument("--events", action="store_true", help="also list every round's decisions, in order, with their times")
    p.set_defaults(func=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    from fedmerge.server.config import load_federation_config

    cfg = load_federation_config(args.config)
    render = status_json_text if args.json else (render_with_events if args.events else render_text)
    if not args.watch:
        print(render(cfg, read_records(cfg)))
        return 0
    clear = sys.stdout.isatty() and not args.json
    return watch(cfg, lambda text: print(("\033[2J\033[H" if clear else "") + text, flush=True), render, interval=args.interval)


def read_records(cfg: FederationConfig) -> list[RoundRecord]:
    if not (cfg.state / "rounds").is_dir():
        return []
    return RoundLedger(cfg.state, create=False).records()


def finished(cfg: FederationConfig, records: list[RoundRecord]) -> bool:
    """Every round is done, or the last one failed (the coordinator stopped)."""
    if any(r.status == RoundStatus.FAILED for r in records[-1:]):
        return True
    return sum(1 for r in records if r.status.terminal) >= cfg.rounds


def watch(
    cfg: FederationConfig,
    emit: Callable[[str], None],
    render: Callable[[FederationConfig, list[RoundRecord]], str],
    *,
    interval: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Render, wait, render again, until the rounds are finished; 1 if the last round failed."""
    last = None
    while True:
        records = read_records(cfg)
        text = render(cfg, records)
        if text != last:
            emit(text)
            last = text
        if finished(cfg, records):
            return 1 if records and records[-1].status == RoundStatus.FAILED else 0
        sleep(interval)


# -- JSON ----------------------------------------------------------------------------------------
def status_json(cfg: FederationConfig, records: list[RoundRecord], events: bool = False) -> dict[str, Any]:
    return {
        "federation": cfg.name,
        "state_dir": str(cfg.state),
        "rounds_planned": cfg.rounds,
        "rounds": [
            {
                **r.model_dump(mode="json", exclude=None if events else {"events"}),
                "institutions": {inst: {"state": st.value, "detail": why} for inst, (st, why) in r.institution_states().items()},
            }
            for r in records
        ],
    }


def status_json_text(cfg: FederationConfig, records: list[RoundRecord]) -> str:
    return json.dumps(status_json(cfg, records), indent=2)


# -- text ----------------------------------------------------------------------------------------
def _short(fp: str | None) -> str:
    return (fp[:19] + "…") if fp and len(fp) > 20 else (fp or "?")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def render_text(cfg: FederationConfig, records: list[RoundRecord], events: bool = False) -> str:
    done = sum(1 for r in records if r.status.terminal)
    lines = [f"federation {cfg.name}: {done} of {cfg.rounds} round(s) done (state {cfg.state})"]
    if not records:
        lines.append("no round started yet")
    for r in records:
        lines += ["", *_round_lines(r)]
        if events:
            lines += [_event_line(e) for e in r.events]
    return "\n".join(lines)


def render_with_events(cfg: FederationConfig, records: list[RoundRecord]) -> str:
    return render_text(cfg, records, events=True)


def _event_line(e) -> str:
    who = e.institution or (f"node {e.node}" if e.node is not None else "")
    stamp = time.strftime("%H:%M:%S", time.localtime(e.at))
    return f"    {stamp}  {e.kind.value:<10} {who:<14} {e.detail}".rstrip()


def _round_lines(r: RoundRecord) -> list[str]:
    ref = f"reference {r.reference.kind}{f' (round {r.reference.round})' if r.reference.round else ''} {_short(r.reference.fingerprint)}"
    method = r.strategy.get("method")
    if r.selection is not None and r.selection.chosen is not None:
        method = f"{r.selection.candidate(r.selection.chosen).label} (candidate {r.selection.chosen})"
    head = f"round {r.round}: {r.status.value}{f' (attempt {r.attempts})' if r.attempts > 1 else ''}; {method}; {ref}"
    out = [head]
    if r.failure:
        out.append(f"  failure       {r.failure}")
    states = r.institution_states()
    width = max([len(i) for i in states] + [12])
    for inst, (state, why) in states.items():
        out.append(f"  {inst:<{width}}  {state.value:<12}  {why}".rstrip())
    for e in r.excluded:
        if e.institution is None:
            out.append(f"  {'node ' + str(e.node):<{width}}  {'excluded':<12}  {e.reason}")
    if r.selection is not None:
        out += _selection_lines(r.selection)
    if r.merge is not None:
        out.append(f"  merge         {len(r.merge.contributors)} contribution(s) in {r.merge.seconds:.2f} s -> {_short(r.merge.fingerprint)}")
    if r.evaluation is not None:
        if r.evaluation.error:
            out.append(f"  evaluation    failed: {r.evaluation.error}")
        else:
            scores = "; ".join(f"{task} {m} {v:.4f}" for task, ms in sorted(r.evaluation.scores.items()) for m, v in sorted(ms.items()) if v is not None)
            out.append(f"  evaluation    {scores or 'no scores'}")
    if r.gate is not None:
        out.append(f"  gate          {'published' if r.gate.publish else 'REFUSED'}: {r.gate.reason}")
    p = r.publication
    if p is not None:
        line = f"  publication   round {p.round} signed by {p.signer}, {_short(p.fingerprint)}, {_size(p.model_bytes)}"
        if p.targets:
            line += f"; installed by {len(p.installed)} of {len(p.targets)}: {', '.join(p.installed) or 'none'}"
        out.append(line)
        for d in p.failures:
            out.append(f"                not installed by {d.institution}: {d.reason}")
    elif r.status == RoundStatus.REFUSED:
        out.append("  publication   none: the gate refused the model; the previous one stays current")
    return out


def _selection_lines(sel) -> list[str]:
    if sel.chosen is not None:
        verdict = f"published {sel.chosen} ({sel.reason})"
    elif sel.fallback:
        verdict = f"FALLBACK: {sel.reason}"
    else:
        verdict = "in progress"
    out = [f"  selection     {sel.mode}, rule {sel.rule}; {verdict}"]
    width = max([len(c.label) for c in sel.candidates] + [8])
    for c in sel.candidates:
        mark = "*" if c.id == sel.chosen else " "
        value = f"{sel.values[c.id]:.4f}" if c.id in sel.values else "  -   "
        by = " | ".join(
            f"{scorer}: " + ", ".join(f"{t} {v:.4f}" for t, v in sorted(table[c.id].items()))
            for scorer, table in sorted(sel.scores.items()) if c.id in table
        )  # fmt: skip
        out.append(f"  {mark} {c.id:<4} {c.label:<{width}}  {value}  {by}".rstrip())
    for cid, why in sorted(sel.unbuilt.items()):
        out.append(f"    {cid:<4} not built: {why}")
    for f in sel.failures:
        out.append(f"    not scored by {f.scorer}: {f.reason}")
    if sel.bytes_sent:
        sent = sorted(set(sel.bytes_sent.values()))
        if len(sent) == 1:
            out.append(f"    candidates sent: {_size(sent[0])} to each of {', '.join(sorted(sel.bytes_sent))}")
        else:
            out.append("    candidates sent: " + ", ".join(f"{_size(n)} to {inst}" for inst, n in sorted(sel.bytes_sent.items())))
    return out
