"""Reusable Flax NNX layers: attention families (layers.attention), pooling heads for
classifiers (layers.pooling), norms, MLPs, embeddings, the linear projection and the
transformer block.

Every parameter carries `logical_axes` metadata (names such as "embed", "heads",
"kv_heads", "head_dim", "mlp", "vocab"); the train loop maps those names to
mesh axes with a rules table (zoo/training/sharding.py). Creating a layer needs
no mesh, so the layers work in any user's model as plain NNX modules.
"""
