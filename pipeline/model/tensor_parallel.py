"""How DeepSpeed AutoTP splits the GPT (pipeline.model.gpt) across tensor-parallel ranks, by layer name.

The model itself knows nothing of parallelism; these specs are applied to it from outside (the DeepSpeed config,
pipeline.train.ds_config) and undone when a checkpoint is consolidated (pipeline.checkpoint.consolidate).
"""

# AutoTP partition specs: they match the module names of pipeline.model.gpt.GPT. Column-parallel layers split
# their output features (q/k/v heads, MLP hidden units); row-parallel layers split their input features
# and all-reduce the result.
AUTOTP_LAYER_SPECS = [
    {"patterns": [r".*\.o_proj\.weight$", r".*\.down_proj\.weight$"], "partition_type": "row"},
    {
        "patterns": [r".*\.[qkv]_proj\.weight$", r".*\.up_proj\.weight$", r".*\.gate_proj\.weight$"],
        "partition_type": "column",
    },
]
