"""The model runner: turns a SchedulerOutput into tensors, runs the model, samples.

It owns the device state: the model, the paged KV cache
``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`` and the sampler.
Inputs are built from Python ints in one pass per request (no per-token tensor ops), then
moved to the device in a handful of tensors; slot mapping is computed vectorised.
"""

from __future__ import annotations

import torch

from engine.attention.metadata import AttentionMetadata
from engine.batch import ModelRunnerOutput, SchedulerOutput
from engine.sampler import Sampler


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, block_size: int,
                 device: torch.device, seed: int = 0) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler(device, seed)

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> ModelRunnerOutput:
        input_ids, positions, metadata, sample_rows = self._prepare(batch)
        hidden = self.model(input_ids, positions, self.kv_cache, metadata)
        if not sample_rows:
            return ModelRunnerOutput([], None)
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        requests = [e.request for e in batch.scheduled if e.sample]
        tokens, logprobs = self.sampler(logits, requests)
        return ModelRunnerOutput(tokens, logprobs)

    def _prepare(self, batch: SchedulerOutput):
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        for entry in batch.scheduled:
            request, start, n = entry.request, entry.start, entry.num_new_tokens
            input_ids.extend(request.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            query_lens.append(n)
            seq_lens.append(start + n)
            tables.append(request.block_ids)
            if entry.sample:
                sample_rows.append(len(input_ids) - 1)
        dev = self.device
        max_blocks = max(len(t) for t in tables)
        padded = [t + [0] * (max_blocks - len(t)) for t in tables]
        block_tables = torch.tensor(padded, dtype=torch.int32, device=dev)
        positions_t = torch.tensor(positions, dtype=torch.long, device=dev)
        metadata = AttentionMetadata(
            slot_mapping=self._slot_mapping(block_tables, positions_t, query_lens),
            cu_seqlens_q=_cumsum0(query_lens, dev),
            cu_seqlens_k=_cumsum0(seq_lens, dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=block_tables,
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            num_decodes=batch.num_decodes,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
        )
        input_ids_t = torch.tensor(input_ids, dtype=torch.long, device=dev)
        return input_ids_t, positions_t, metadata, sample_rows

    def _slot_mapping(self, block_tables: torch.Tensor, positions: torch.Tensor,
                      query_lens: list[int]) -> torch.Tensor:
        # slot = block_table[seq, pos // block_size] * block_size + pos % block_size
        bs = self.block_size
        if len(query_lens) == positions.numel():  # all decodes: one token per sequence
            rows = torch.arange(len(query_lens), device=positions.device)
        else:
            device = positions.device
            lens = torch.tensor(query_lens, device=device)
            rows = torch.repeat_interleave(torch.arange(len(query_lens), device=device), lens)
        blocks = block_tables[rows, positions // bs].long()
        return blocks * bs + positions % bs


def _cumsum0(values: list[int], device: torch.device) -> torch.Tensor:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return torch.tensor(out, dtype=torch.int32, device=device)
