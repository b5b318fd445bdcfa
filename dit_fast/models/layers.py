# The layers DiT is built from, with the official parameter names: PatchEmbed, Attention and Mlp
# as timm's (timm is not needed), TimestepEmbedder and LabelEmbedder as the official models.py.
# Their forward passes run dit_fast's fused ops (dit_fast.ops).

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import attention_qkv, linear_gelu, timestep_embedding, timestep_embedding_ref
from ..ops.linear import linear


#################################################################################
#                   Layers with timm's parameter names                          #
#################################################################################

class PatchEmbed(nn.Module):
    """2D image to patch embedding: (N, C, H, W) -> (N, T, D). Keys: proj.weight, proj.bias."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim, bias=True):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x):
        x = self.proj(x)                                # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)             # (N, T, D)


class Attention(nn.Module):
    """Multi-head self-attention. Keys: qkv.weight, qkv.bias, proj.weight, proj.bias."""

    def __init__(self, dim, num_heads=8, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        qkv = linear(self.qkv, x)                        # (N, T, 3D), packed (3, H, Dh) per token
        x = attention_qkv(qkv, self.num_heads)           # (N, T, D), q/k/v read in place
        return linear(self.proj, x)                      # (N, T, D)


class CrossAttention(nn.Module):
    """Multi-head cross-attention from image tokens to a conditioning sequence.
    Keys: q.weight, q.bias, kv.weight, kv.bias, proj.weight, proj.bias."""

    def __init__(self, dim, num_heads=8):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cond):
        N, T, D = x.shape
        S = cond.shape[1]
        q = self.q(x).reshape(N, T, self.num_heads, self.head_dim).transpose(1, 2)  # (N, H, T, Dh)
        kv = self.kv(cond).reshape(N, S, 2, self.num_heads, self.head_dim)        # (N, S, 2, H, Dh)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)                                 # 2 x (N, H, S, Dh)
        x = F.scaled_dot_product_attention(q, k, v)                                # (N, H, T, Dh)
        x = x.transpose(1, 2).reshape(N, T, D)                                     # (N, T, D)
        return self.proj(x)                                                        # (N, T, D)


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2. Keys: fc1.weight, fc1.bias, fc2.weight, fc2.bias.
    fc1's bias and the GELU (`act`) run as the fc1 GEMM's epilogue (ops.linear_gelu)."""

    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        h = linear_gelu(x, self.fc1.weight, self.fc1.bias)  # (N, T, M) = act(fc1(x))
        return linear(self.fc2, h)                          # (N, T, D)


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

class TimestepEmbedder(nn.Module):
    """
    Embeds scalar timesteps into vector representations.
    """
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """
        Create sinusoidal timestep embeddings.
        :param t: a 1-D Tensor of N indices, one per batch element.
                          These may be fractional.
        :param dim: the dimension of the output.
        :param max_period: controls the minimum frequency of the embeddings.
        :return: an (N, D) Tensor of positional embeddings (float32).
        """
        # https://github.com/openai/glide-text2im/blob/main/glide_text2im/nn.py (the official code,
        # which is also the fused op's reference)
        return timestep_embedding_ref(t, dim, max_period)

    def forward(self, t):
        dtype = self.mlp[0].weight.dtype
        if self.timestep_embedding is not _OFFICIAL_TIMESTEP_EMBEDDING:     # overridden (subclass / patch)
            t_freq = self.timestep_embedding(t, self.frequency_embedding_size).to(dtype)  # (N, 256)
            return self.mlp(t_freq)                                         # (N, D)
        if t.dtype not in (torch.float32, torch.float64, torch.int32, torch.int64):
            t = t.float()                                                   # as timestep_embedding does
        # = self.timestep_embedding(t, 256).to(model dtype), in one kernel (float32 math)
        t_freq = timestep_embedding(t.contiguous(), self.frequency_embedding_size, dtype=dtype)  # (N, 256)
        return self.mlp(t_freq)                                             # (N, D)


_OFFICIAL_TIMESTEP_EMBEDDING = TimestepEmbedder.timestep_embedding


class LabelEmbedder(nn.Module):
    """
    Embeds class labels into vector representations. Also handles label dropout for classifier-free guidance.
    """
    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """
        Drops labels to enable classifier-free guidance.
        """
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        labels = torch.where(drop_ids, self.num_classes, labels)
        return labels

    def forward(self, labels, train, force_drop_ids=None):
        use_dropout = self.dropout_prob > 0
        if (train and use_dropout) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        embeddings = self.embedding_table(labels)
        return embeddings
