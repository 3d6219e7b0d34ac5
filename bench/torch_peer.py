"""The PyTorch peer of the throughput benchmark: a Llama-style LM in plain torch
(pre-norm RMSNorm, GQA via SDPA with causal masking, RoPE, SwiGLU, tied
embeddings), trained with AdamW in eager mode on the same shapes. Written here
so the baseline runs in the same process without transformers."""

from __future__ import annotations

import statistics
import time


def time_step(*, layers, d_model, mlp_dim, heads, kv_heads, vocab, seq, batch, steps, warmup) -> float:
  import torch
  import torch.nn.functional as F
  from torch import nn

  hd = d_model // heads
  inv = 10000.0 ** (-torch.arange(0, hd, 2).float() / hd)
  ang = torch.arange(seq).float()[:, None] * inv
  cos, sin = ang.cos()[None, None], ang.sin()[None, None]

  def rope(x):
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.n1, self.n2 = nn.RMSNorm(d_model), nn.RMSNorm(d_model)
      self.q = nn.Linear(d_model, heads * hd, bias=False)
      self.kv = nn.Linear(d_model, 2 * kv_heads * hd, bias=False)
      self.o = nn.Linear(heads * hd, d_model, bias=False)
      self.gu = nn.Linear(d_model, 2 * mlp_dim, bias=False)
      self.down = nn.Linear(mlp_dim, d_model, bias=False)

    def forward(self, x):
      b, t, _ = x.shape
      h = self.n1(x)
      q = self.q(h).view(b, t, heads, hd).transpose(1, 2)
      k, v = self.kv(h).view(b, t, 2, kv_heads, hd).permute(2, 0, 3, 1, 4)
      a = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True,
                                         enable_gqa=kv_heads != heads)
      x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
      g, u = self.gu(self.n2(x)).chunk(2, -1)
      return x + self.down(F.silu(g) * u)

  class LM(nn.Module):
    def __init__(self):
      super().__init__()
      self.emb = nn.Embedding(vocab, d_model)
      self.blocks = nn.ModuleList(Block() for _ in range(layers))
      self.norm = nn.RMSNorm(d_model)

    def forward(self, x):
      h = self.emb(x)
      for blk in self.blocks:
        h = blk(h)
      return self.norm(h) @ self.emb.weight.T

  torch.manual_seed(0)
  model = LM()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  toks = torch.randint(3, vocab, (batch, seq + 1))
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    loss = F.cross_entropy(model(toks[:, :-1]).reshape(-1, vocab), toks[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return statistics.median(times)
