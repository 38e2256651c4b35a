"""The in-request softmax (listwise) loss beside BCE (``train.listwise_weight``).

Checked against a plain per-request reference; requests without a click are left out; it orders
candidates within a request and ignores shifts shared by a whole request; every neural model trains
with it (``tests/test_cross.py``).
"""

from __future__ import annotations

import math

import torch

from qdrank.models.base import request_softmax_loss


def reference(logit: list[float], label: list[float], req: list[int]) -> float:
    per = []
    for r in sorted(set(req)):
        idx = [i for i, q in enumerate(req) if q == r]
        clicks = sum(label[i] for i in idx)
        if clicks == 0:
            continue
        lse = math.log(sum(math.exp(logit[i]) for i in idx))
        per.append(sum(-label[i] * (logit[i] - lse) for i in idx) / clicks)
    return sum(per) / len(per)


def test_matches_per_request_reference():
    g = torch.Generator().manual_seed(0)
    req = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]          # request 3 has one candidate, request 1 no click
    label = [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    logit = (torch.randn(len(req), generator=g) * 3).tolist()
    got = request_softmax_loss(torch.tensor(logit), torch.tensor(label), torch.tensor(req), 4)
    assert abs(float(got) - reference(logit, label, req)) < 1e-5


def test_no_click_no_loss_and_request_shift_invariant():
    req = torch.tensor([0, 0, 1, 1, 1])
    logit = torch.tensor([0.3, -1.0, 2.0, 0.5, -0.2], requires_grad=True)
    none = request_softmax_loss(logit, torch.zeros(5), req, 2)
    none.backward()
    assert float(none.detach()) == 0.0 and float(logit.grad.abs().sum()) == 0.0
    label = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0])
    shifted = logit.detach() + torch.tensor([5.0, 5.0, -40.0, -40.0, -40.0])  # a constant per request
    a = request_softmax_loss(logit.detach(), label, req, 2)
    b = request_softmax_loss(shifted, label, req, 2)
    assert abs(float(a) - float(b)) < 1e-5
    # huge logits stay finite (log-sum-exp with the request's max)
    assert math.isfinite(float(request_softmax_loss(logit.detach() * 1e4, label, req, 2)))


def test_gradient_raises_the_clicked_candidate():
    req = torch.tensor([0, 0, 0])
    logit = torch.zeros(3, requires_grad=True)
    request_softmax_loss(logit, torch.tensor([0.0, 1.0, 0.0]), req, 1).backward()
    assert logit.grad[1] < 0 < logit.grad[0] and logit.grad[0] == logit.grad[2]
