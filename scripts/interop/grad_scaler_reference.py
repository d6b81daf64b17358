"""torch.amp.GradScaler on a synthetic sequence of steps, the reference for lorafit's loss scaler.

Reads JSON from stdin: {"settings": {"init_scale", "growth_factor", "backoff_factor",
"growth_interval"}, "inputs": [x, ...]} where each x is the value every gradient entry of the
step is multiplied by ("inf", "nan" or a number; a huge number overflows once scaled). Each step
runs loss = sum(p * x) through GradScaler as a training loop does (scale, backward, unscale_,
step, update) and records the scale after the update and whether the optimizer step was taken.
Writes JSON to stdout: {"scales": [...], "applied": [...]}.
"""

import json
import sys

import torch

request = json.load(sys.stdin)
s = request["settings"]
scaler = torch.amp.GradScaler(
    "cpu",
    init_scale=s["init_scale"],
    growth_factor=s["growth_factor"],
    backoff_factor=s["backoff_factor"],
    growth_interval=s["growth_interval"],
)


class CountingSGD(torch.optim.SGD):
    """SGD that counts its steps: GradScaler.step calls it only when no gradient is inf/NaN."""

    taken = 0

    def step(self, closure=None):
        self.taken += 1
        return super().step(closure)


p = torch.nn.Parameter(torch.ones(4))
optimizer = CountingSGD([p], lr=0.1)
scales, applied = [], []
for x in request["inputs"]:
    x = torch.full((4,), float(x), dtype=torch.float32)
    optimizer.zero_grad()
    scaler.scale((p * x).sum()).backward()
    scaler.unscale_(optimizer)
    taken = optimizer.taken
    scaler.step(optimizer)
    scaler.update()
    applied.append(optimizer.taken > taken)
    scales.append(scaler.get_scale())
json.dump({"scales": scales, "applied": applied}, sys.stdout)
