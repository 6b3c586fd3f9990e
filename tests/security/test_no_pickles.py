"""Never unpickle: the evaluator refuses a pickle-only model folder before transformers sees it."""

from __future__ import annotations

import json
import pickle

import pytest

from fedmerge.checkpoints import PickledWeightsRefused


class _Booby:
    """Unpickling this creates a file: proof, if the marker ever appears, that something unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("fingerprint", [True, False])
def test_eval_refuses_a_pytorch_model_bin_folder_before_loading_it(fingerprint, tmp_path, monkeypatch):
    import lm_eval.models.huggingface as hf

    from fedmerge.eval.config import EvalConfig
    from fedmerge.eval.evaluator import Evaluator
    from fedmerge.eval.tasks import write_local_task

    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps(_Booby(str(marker)))
    # The control: this payload does create the marker when unpickled.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Booby(str(control))))
    assert control.exists()

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    (model / "pytorch_model.bin").write_bytes(payload)
    items = [{"id": f"q{i}", "question": f"question {i}?", "choices": ["a", "b", "c", "d"], "answer": i % 4} for i in range(4)]
    write_local_task(tmp_path / "tasks", "toy_medqa", items, kind="medqa")
    cfg = EvalConfig(tasks=["toy_medqa"], task_dirs=[tmp_path / "tasks"], num_fewshot=0, device="cpu", batch_size=1, store=None, fingerprint=fingerprint)
    loads: list = []
    monkeypatch.setattr(hf.HFLM, "__init__", lambda self, *a, **kw: loads.append(kw) or None)  # records any load
    with pytest.raises(PickledWeightsRefused) as exc:
        Evaluator(cfg, store=None).evaluate(model, label="pickled")
    assert str(model) in str(exc.value) and "pytorch_model.bin" in str(exc.value)
    assert not marker.exists() and loads == []


def test_eval_loads_safetensors_folders_with_the_pickle_fallback_off(models, tmp_path, monkeypatch):
    import lm_eval.models.huggingface as hf

    from fedmerge.eval.config import EvalConfig
    from fedmerge.eval.evaluator import Evaluator
    from fedmerge.eval.tasks import write_local_task

    class Stop(Exception):
        pass

    loads: list = []

    def fake_init(self, *a, **kw):
        loads.append(kw)
        raise Stop

    monkeypatch.setattr(hf.HFLM, "__init__", fake_init)
    items = [{"id": f"q{i}", "question": f"question {i}?", "choices": ["a", "b", "c", "d"], "answer": i % 4} for i in range(4)]
    write_local_task(tmp_path / "tasks", "toy_medqa", items, kind="medqa")
    cfg = EvalConfig(tasks=["toy_medqa"], task_dirs=[tmp_path / "tasks"], num_fewshot=0, device="cpu", batch_size=1, store=None)
    with pytest.raises(Stop):
        Evaluator(cfg, store=None).evaluate(models[0], label="base")
    assert len(loads) == 1 and loads[0]["use_safetensors"] is True
