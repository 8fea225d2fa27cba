"""check_weights_file: the format comes from the bytes; a damaged file is a one-line ModelError naming it."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import onnx
import pytest
import safetensors.torch
import torch
from onnx import TensorProto, helper

from studio.errors import ModelError, UnsafeFileError
from studio.models.weights import check_weights_file, load_weights


def _safetensors(path: Path) -> Path:
    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.ones(4, dtype=torch.float16),
    }
    safetensors.torch.save_file(tensors, str(path))
    return path


def _onnx(path: Path) -> Path:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [1.0, 0.0, 0.0, 1.0])
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _damaged(path: Path, fragment: str) -> str:
    with pytest.raises(ModelError) as info:
        check_weights_file(path, allow_pickle=True)
    message = str(info.value)
    assert str(path) in message and fragment in message and "again" in message
    assert "\n" not in message
    return message


def test_good_files_report_their_format(tmp_path: Path) -> None:
    assert check_weights_file(_safetensors(tmp_path / "m.safetensors"), allow_pickle=False) == "safetensors"
    assert check_weights_file(_onnx(tmp_path / "m.onnx"), allow_pickle=False) == "onnx"
    torch.save({"w": torch.ones(2)}, tmp_path / "m.pth")
    assert check_weights_file(tmp_path / "m.pth", allow_pickle=True) == "pickle"
    torch.save({"w": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert check_weights_file(tmp_path / "old.pt", allow_pickle=True) == "pickle"


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = _safetensors(tmp_path / "cut.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    _damaged(path, f"truncated: tensors end at byte {len(data)}, file has {len(data) - 1}")
    with pytest.raises(ModelError, match=r"cut\.safetensors"):
        load_weights(path, allow_pickle=False)


def test_header_claiming_gigabytes(tmp_path: Path) -> None:
    path = _safetensors(tmp_path / "huge.safetensors")
    data = path.read_bytes()
    path.write_bytes((8 * 10**9).to_bytes(8, "little") + data[8:])
    _damaged(path, "header claims 8.0 GB but the file is")


def test_trailing_garbage(tmp_path: Path) -> None:
    path = _safetensors(tmp_path / "tail.safetensors")
    path.write_bytes(path.read_bytes() + b"junk")
    _damaged(path, "4 bytes of trailing data")


def test_offsets_that_disagree_with_the_shape(tmp_path: Path) -> None:
    header = json.dumps({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "shape.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    _damaged(path, "needs 12 bytes")


def test_zip_pickle_named_safetensors_is_a_pickle(tmp_path: Path) -> None:
    path = tmp_path / "disguised.safetensors"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(UnsafeFileError, match="pickle") as info:
        check_weights_file(path, allow_pickle=False)
    assert "disguised.safetensors" in str(info.value)
    assert check_weights_file(path, allow_pickle=True) == "pickle"


def test_zip_without_a_torch_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "archive.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    _damaged(path, "no data.pkl")


def test_truncated_onnx(tmp_path: Path) -> None:
    path = _onnx(tmp_path / "cut.onnx")
    path.write_bytes(path.read_bytes()[:-3])
    _damaged(path, "truncated")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    _damaged(path, "empty")


def test_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "notes.bin"
    path.write_bytes(b"<html>not a model</html>")
    _damaged(path, "not a model format")


def test_diffusers_folder_with_a_damaged_weights_file(tmp_path: Path) -> None:
    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    weights = _safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert check_weights_file(folder, allow_pickle=False) == "diffusers"
    weights.write_bytes(weights.read_bytes()[:-1])
    with pytest.raises(ModelError, match="truncated") as info:
        check_weights_file(folder, allow_pickle=False)
    assert str(weights) in str(info.value)
