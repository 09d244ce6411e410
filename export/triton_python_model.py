"""Triton python-backend model: the exported Med-DDPM denoiser run with ONNX Runtime on the CPU.

`python -m export` copies this file to `<name>_cpu/1/model.py`, beside `model.onnx`. It serves the same
tensors under the same names as the ONNX Runtime backend entry, for Triton servers without that backend.
Requests that Triton's dynamic batcher groups are run as one ONNX Runtime call.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        onnx_file = config["parameters"]["onnx_file"]["string_value"]
        path = os.path.join(args["model_repository"], args["model_version"], onnx_file)
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.output_name = config["output"][0]["name"]
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        inputs = [[pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.input_names] for r in requests]
        sizes = [len(tensors[0]) for tensors in inputs]
        feed = {name: np.concatenate([tensors[i] for tensors in inputs]) for i, name in enumerate(self.input_names)}
        output = self.session.run([self.output_name], feed)[0]
        responses = []
        for piece in np.split(output, np.cumsum(sizes)[:-1]):
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, np.ascontiguousarray(piece))]))
        return responses
