"""The parameter counts the bench divides by: MFU's (non-embedding) and 4N TF/s's (every parameter)."""

from __future__ import annotations

import pytest

from benchmarks.workloads import WORKLOADS, all_params, non_embedding_params


@pytest.mark.parametrize(
    "name,everything,matmul",
    [
        # OpenLLaMA-3B: 32,000 x 3,200 embeddings (102,400,000) on top of the weights that do matmul work per token
        ("w3b-4bit", 3_426_473_600, 3_324_073_600),
        ("mistral7b-4bit", 7_241_732_096, 7_110_660_096),
    ],
)
def test_4n_counts_every_parameter_and_mfu_leaves_out_the_input_embedding(name, everything, matmul):
    workload = WORKLOADS[name]
    assert all_params(workload) == everything
    assert non_embedding_params(workload) == matmul
    assert everything - matmul == workload.vocab_size * workload.arch["hidden_size"]


def test_4n_tf_per_s_gives_the_published_anchors_figure():
    """Issue 31's anchor: OpenLLaMA-3B at 13,810 tokens/s is 189 4N TF/s."""
    assert round(4 * all_params(WORKLOADS["w3b-4bit"]) * 13_810 / 1e12) == 189
