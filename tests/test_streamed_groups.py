"""The streamed parity runs batches of one shape as one forward (lor2c_ds/export/streamed.py `_groups`)."""
from __future__ import annotations

import torch

from lor2c_ds.export.streamed import _groups


def test_batches_group_by_shape_and_pass_non_tensor_arguments_through():
    """Packed causal-LM batches carry `position_ids` and `use_cache=False` (lor2c_ds.data.model_inputs)."""
    def packed(rows, seq):
        ids = torch.arange(rows * seq).reshape(rows, seq)
        return {"input_ids": ids, "position_ids": ids % 5, "use_cache": False}

    batches = [packed(2, 8), packed(3, 8), packed(2, 6), {**packed(1, 8), "use_cache": True}]
    groups = list(_groups(batches))
    assert [rows for rows, _ in groups] == [[0, 1], [2], [3]]
    rows, first = groups[0]
    assert first["use_cache"] is False and first["input_ids"].shape == (5, 8)
    assert torch.equal(first["input_ids"], torch.cat([batches[0]["input_ids"], batches[1]["input_ids"]]))
    assert groups[2][1]["use_cache"] is True
