"""Drive a server with the real ``tritonclient[grpc]``, in its own process.

tritonclient and ``rulewright.inference`` both register the ``inference`` proto package in
protobuf's default pool, so they cannot share a process: tests run this file with
``sys.executable``, a JSON plan on stdin, and read one JSON object from stdout.

Plan: ``{"address": "host:port", "calls": [{"op": ..., ...}, ...]}``; each call's result (or
``{"error": "NOT_FOUND", "message": ...}``) comes back in order under ``"results"``. Ops:
``live``, ``ready``, ``model_ready`` (model, version), ``server_metadata``, ``model_metadata``
(model, version), ``infer`` (model, version, seed or z, truncation, parameters, request_id,
outputs, token); infer answers the response's model_name, model_version, id, and the ``image``
output's shape, dtype and pixels (base64).
"""

from __future__ import annotations

import base64
import json
import sys

import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException


def infer(client: tc.InferenceServerClient, call: dict) -> dict:
    """One ModelInfer as tritonclient sends it (raw_input_contents), the image decoded by tritonclient."""
    inputs = []
    for name, dtype, np_dtype in (("seed", "INT64", np.int64), ("z", "FP32", np.float32),
                                  ("truncation", call.get("truncation_datatype", "FP32"), None)):
        if name in call:
            value = np.asarray(call[name], dtype=np_dtype or {"FP32": np.float32, "FP64": np.float64}[dtype])
            tensor = tc.InferInput(name, list(value.shape), dtype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
    outputs = [tc.InferRequestedOutput(name) for name in call.get("outputs", [])] or None
    headers = {"authorization": f"Bearer {call['token']}"} if call.get("token") else None
    result = client.infer(call["model"], inputs, model_version=call.get("version", ""), outputs=outputs,
                          request_id=call.get("request_id", ""), parameters=call.get("parameters"),
                          headers=headers, client_timeout=60)
    response = result.get_response()
    image = result.as_numpy("image")
    return {"model_name": response.model_name, "model_version": response.model_version, "id": response.id,
            "shape": list(image.shape), "dtype": str(image.dtype),
            "pixels": base64.b64encode(image.tobytes()).decode("ascii")}


def run(client: tc.InferenceServerClient, call: dict):
    """The result of one planned call."""
    op = call["op"]
    if op == "live":
        return client.is_server_live()
    if op == "ready":
        return client.is_server_ready()
    if op == "model_ready":
        return client.is_model_ready(call["model"], call.get("version", ""))
    if op == "server_metadata":
        return client.get_server_metadata(as_json=True)
    if op == "model_metadata":
        return client.get_model_metadata(call["model"], call.get("version", ""), as_json=True)
    if op == "infer":
        return infer(client, call)
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    """Run the plan on stdin; print the results as one JSON object."""
    plan = json.load(sys.stdin)
    client = tc.InferenceServerClient(plan["address"])
    results = []
    for call in plan["calls"]:
        try:
            results.append(run(client, call))
        except InferenceServerException as exc:
            results.append({"error": (exc.status() or "").removeprefix("StatusCode."), "message": exc.message()})
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
