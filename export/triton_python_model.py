"""Triton python-backend model: the exported Med-DDPM denoiser on the CPU, with OpenVINO (FP32) where the server's
python has it, else ONNX Runtime: the runtime the app's `--backend auto` takes on a CPU.

`python -m export` copies this file to `<name>_cpu/1/model.py`, beside `model.onnx`. It serves the same
tensors under the same names as the ONNX Runtime backend entry, for Triton servers without that backend.
Requests that Triton's dynamic batcher groups are run as one call (OpenVINO compiles the graph once per batch size).
It refuses to load a graph whose SHA-256 is not the one its config records (`onnx_sha256`, written by the export).
"""

import hashlib
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

try:
    import openvino as ov
except ImportError:  # a server python without OpenVINO: ONNX Runtime
    ov = None


def check_sha256(path, expected):
    """The graph must be the exported one (this file travels alone: meddpm.model.checkpoint.sha256_of is not here)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:  # in blocks: hashlib.file_digest needs Python 3.11, a Triton image's may be older
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    found = digest.hexdigest()
    if found != expected:
        raise pb_utils.TritonModelException(
            f"{path}: SHA-256 {found}, but config.pbtxt records onnx_sha256 {expected or 'none'}: the graph changed "
            f"after export (weights edited, or another file copied over it); re-run `python -m export` into this "
            f"model repository and load the model again"
        )


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        onnx_file = config["parameters"]["onnx_file"]["string_value"]
        path = os.path.join(args["model_repository"], args["model_version"], onnx_file)
        check_sha256(path, config["parameters"].get("onnx_sha256", {}).get("string_value"))
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.output_name = config["output"][0]["name"]
        if ov is not None:
            self.core = ov.Core()
            self.graph = self.core.read_model(path)
            self.compiled = {}  # batch size -> the graph compiled for it
            pb_utils.Logger.log_info(f"{path}: OpenVINO {ov.get_version()}, FP32")
        else:
            import onnxruntime as ort

            self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            pb_utils.Logger.log_info(f"{path}: ONNX Runtime {ort.__version__}")

    def execute(self, requests):
        inputs = [
            [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.input_names] for r in requests
        ]
        sizes = [len(tensors[0]) for tensors in inputs]
        feed = {name: np.concatenate([tensors[i] for tensors in inputs]) for i, name in enumerate(self.input_names)}
        output = self.run(feed)
        responses = []
        for piece in np.split(output, np.cumsum(sizes)[:-1]):
            responses.append(
                pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, np.ascontiguousarray(piece))])
            )
        return responses

    def run(self, feed):
        if ov is None:
            return self.session.run([self.output_name], feed)[0]
        batch = len(feed[self.input_names[0]])
        if batch not in self.compiled:
            graph = self.graph.clone()
            graph.reshape({name: list(array.shape) for name, array in feed.items()})
            self.compiled[batch] = self.core.compile_model(
                graph, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
            )
        request = self.compiled[batch].create_infer_request()
        request.infer({name: np.ascontiguousarray(array) for name, array in feed.items()})
        return request.get_tensor(self.output_name).data.copy()
