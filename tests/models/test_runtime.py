"""Device/dtype choice and ONNX Runtime providers: no silent CPU fallback."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from studio.config import RuntimeConfig
from studio.errors import RuntimeSetupError
from studio.models.runtime import (
    check_session_providers,
    choose_device,
    choose_dtype,
    create_session,
    onnx_providers,
)


def test_auto_device_is_cpu_here_and_cuda_request_fails_clearly() -> None:
    if torch.cuda.is_available():
        pytest.skip("machine has a GPU")
    assert choose_device("auto").type == "cpu"
    with pytest.raises(RuntimeSetupError, match="no cuda device"):
        choose_device("cuda")


def test_dtype_policy() -> None:
    assert choose_dtype(RuntimeConfig(), torch.device("cpu")) == torch.float32
    assert choose_dtype(RuntimeConfig(), torch.device("cuda")) == torch.float16
    assert choose_dtype(RuntimeConfig(dtype="bfloat16"), torch.device("cpu")) == torch.bfloat16
    with pytest.raises(RuntimeSetupError, match="float16"):
        choose_dtype(RuntimeConfig(dtype="float16"), torch.device("cpu"))


def test_cuda_provider_missing_is_an_error_not_a_fallback() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA provider installed")
    with pytest.raises(RuntimeSetupError, match="onnxruntime-gpu"):
        onnx_providers("cuda")
    assert onnx_providers("auto")[-1] == "CPUExecutionProvider"


class _FellBack:
    def get_providers(self) -> list[str]:
        return ["CPUExecutionProvider"]


def test_session_that_lost_its_gpu_provider_is_refused() -> None:
    with pytest.raises(RuntimeSetupError, match="requested CUDAExecutionProvider but ONNX Runtime fell back"):
        check_session_providers(
            _FellBack(), ["CUDAExecutionProvider", "CPUExecutionProvider"], Path("m.onnx")
        )


def test_create_session_reports_active_providers(tmp_path: Path) -> None:
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "id.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    session = create_session(path, ["CPUExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_runtime_threads_reach_every_onnx_session(tiny_overrides: list[str]) -> None:
    from studio.config import load_config
    from studio.faces import load_face_model, load_token_encoder, refine_models
    from studio.models import open_catalogue
    from studio.models.cache import ModelCache

    config = load_config("tiny", overrides=[*tiny_overrides, "runtime.threads=1"])
    models, cache = refine_models(config, open_catalogue(config)), ModelCache()
    for role in ("detector", "recognizer", "swapper"):
        session = load_face_model(models[role], config, cache).session
        assert session.get_session_options().intra_op_num_threads == 1, role
    tokens = load_token_encoder(models["recognizer"], config, cache).session
    assert tokens.get_session_options().intra_op_num_threads == 1
