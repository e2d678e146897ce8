"""DeiT-Tiny (ViT-Ti/16) in timm's layout.

Patch embedding by a 16x16 stride-16 conv (with bias), a class token and a
learned position embedding, 12 pre-LayerNorm transformer blocks (multi-head
self-attention with one fused ``qkv`` dense layer and a ``proj`` dense layer;
a GELU MLP ``fc1``/``fc2``), a final LayerNorm and a dense head on the class
token. The attention and MLP layers are plain ``nn.Dense`` so the default
prunable rule selects their weights and biases, as SFPK prunes timm's Linear
layers; the patch-embedding bias, norms, class token and position embedding
are not prunable. Module names mirror timm's (``blocks.0.attn.qkv`` is
``blocks_0/attn/qkv``), which :func:`sfpk_jax.models.load_pretrained` relies on.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sfpk_jax.models.registry import register

LN_EPSILON = 1e-6  # timm's ViT LayerNorm

# timm initialises Linear weights and the position embedding with a
# truncated normal of std 0.02 (biases 0) and the class token with std 1e-6.
TIMM_INIT = nn.initializers.truncated_normal(stddev=0.02)
CLS_INIT = nn.initializers.normal(stddev=1e-6)
# The patch-embedding conv keeps torch's default init (kaiming_uniform_, a=sqrt(5)).
PATCH_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class PatchEmbed(nn.Module):
    """Non-overlapping patches projected by a strided conv, flattened row-major.

    Attributes:
      patch_size: side of a square patch.
      embed_dim: width of the token embeddings.
    """

    patch_size: int
    embed_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        x = nn.Conv(
            self.embed_dim, (p, p), strides=p, padding="VALID", kernel_init=PATCH_INIT, name="proj",
        )(x)
        return x.reshape((x.shape[0], -1, self.embed_dim))


class Attention(nn.Module):
    """Multi-head self-attention with timm's fused qkv layout.

    The ``qkv`` output features are ordered (q/k/v, head, head_dim), as timm
    reshapes them, so converted timm weights split the same way.

    Attributes:
      num_heads: number of attention heads.
    """

    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, width = x.shape
        head_dim = width // self.num_heads
        qkv = nn.Dense(3 * width, kernel_init=TIMM_INIT, name="qkv")(x)
        qkv = qkv.reshape((batch, tokens, 3, self.num_heads, head_dim))
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape((batch, tokens, width))
        return nn.Dense(width, kernel_init=TIMM_INIT, name="proj")(out)


class Mlp(nn.Module):
    """Dense, exact (erf) GELU like torch's nn.GELU, dense.

    Attributes:
      hidden: width of the hidden layer.
    """

    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        x = nn.gelu(nn.Dense(self.hidden, kernel_init=TIMM_INIT, name="fc1")(x), approximate=False)
        return nn.Dense(width, kernel_init=TIMM_INIT, name="fc2")(x)


def layer_norm(name: str) -> nn.LayerNorm:
    """timm's LayerNorm: eps 1e-6, variance computed two-pass like torch.

    Flax's default one-pass variance (E[x^2] - E[x]^2) loses precision on the
    large-mean residual stream of a trained ViT.
    """
    return nn.LayerNorm(epsilon=LN_EPSILON, use_fast_variance=False, name=name)


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Attributes:
      num_heads: number of attention heads.
      mlp_hidden: width of the MLP's hidden layer.
    """

    num_heads: int
    mlp_hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + Attention(self.num_heads, name="attn")(layer_norm("norm1")(x))
        return x + Mlp(self.mlp_hidden, name="mlp")(layer_norm("norm2")(x))


class VisionTransformer(nn.Module):
    """ViT classifier on the class token (no dropout: timm's inference defaults).

    Attributes:
      num_classes: number of output logits.
      patch_size: side of a square patch.
      embed_dim: token width.
      depth: number of transformer blocks.
      num_heads: attention heads per block.
      mlp_hidden: hidden width of each block's MLP.
    """

    num_classes: int = 1000
    patch_size: int = 16
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_hidden: int = 768

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train  # no layer behaves differently in training
        x = PatchEmbed(self.patch_size, self.embed_dim, name="patch_embed")(x)
        batch, patches, width = x.shape
        cls_token = self.param("cls_token", CLS_INIT, (1, 1, width))
        # The position embedding's length fixes the input resolution, as in timm.
        pos_embed = self.param("pos_embed", TIMM_INIT, (1, patches + 1, width))
        x = jnp.concatenate([jnp.broadcast_to(cls_token, (batch, 1, width)), x], axis=1) + pos_embed
        for index in range(self.depth):
            x = Block(self.num_heads, self.mlp_hidden, name=f"blocks_{index}")(x)
        x = layer_norm("norm")(x)
        return nn.Dense(self.num_classes, kernel_init=TIMM_INIT, name="head")(x[:, 0])


@register("deit_tiny", input_shape=(1, 224, 224, 3))
def deit_tiny(num_classes: int) -> nn.Module:
    """DeiT-Tiny / ViT-Ti/16 for 224x224 images (197 tokens)."""
    return VisionTransformer(num_classes=num_classes)
