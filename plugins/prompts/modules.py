"""The trainable parts of a soft prompt: the table of virtual tokens and the
prompt encoders (P-tuning's MLP / LSTM, prefix tuning's projection)."""

from __future__ import annotations

import torch
from torch import nn


class PromptEncoderMLP(nn.Module):
    def __init__(self, d: int, hidden: int, out: int, like: torch.Tensor, act=nn.ReLU,
                 layers: int = 3):
        super().__init__()
        kw = {"dtype": like.dtype, "device": like.device}
        if layers == 3:  # P-tuning's encoder, as HF PEFT builds it
            self.net = nn.Sequential(nn.Linear(d, hidden, **kw), act(), nn.Linear(hidden, hidden, **kw),
                                     act(), nn.Linear(hidden, out, **kw))
        else:  # prefix tuning's projection
            self.net = nn.Sequential(nn.Linear(d, hidden, **kw), act(), nn.Linear(hidden, out, **kw))

    def forward(self, x):
        return self.net(x)


class PromptEncoderLSTM(nn.Module):
    def __init__(self, d: int, hidden: int, like: torch.Tensor):
        super().__init__()
        kw = {"dtype": like.dtype, "device": like.device}
        self.lstm = nn.LSTM(d, hidden, num_layers=2, bidirectional=True, batch_first=True, **kw)
        self.head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, **kw), nn.ReLU(),
                                  nn.Linear(2 * hidden, d, **kw))

    def forward(self, x):
        return self.head(self.lstm(x.unsqueeze(0))[0]).squeeze(0)


class SoftPrompt(nn.Module):
    """The trainable table of virtual tokens (and its encoder, if any).

    ``table()`` is what the model sees: (tokens, width) for prompts, (tokens,
    layers·2·kv_width) for prefixes. Saved as ``prompt.embeddings``.
    """

    def __init__(self, table: torch.Tensor, encoder: nn.Module | None = None):
        super().__init__()
        self.embeddings = nn.Parameter(table)
        self.encoder = encoder

    @property
    def tokens(self) -> int:
        return self.embeddings.shape[0]

    def table(self) -> torch.Tensor:
        return self.embeddings if self.encoder is None else self.encoder(self.embeddings)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())

    def adapter_state(self) -> dict[str, torch.Tensor]:
        if self.encoder is None:
            return {"embeddings": self.embeddings}
        with torch.no_grad():
            return {"embeddings": self.table().detach()}

    @torch.no_grad()
    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        table = tensors["embeddings"]
        if self.encoder is not None:  # the stored table is the encoder's output
            self.encoder = None
            self.embeddings = nn.Parameter(
                table.to(self.embeddings.dtype).to(self.embeddings.device).clone())
        else:
            self.embeddings.copy_(table)
