"""Pure-torch LSTM (the `reference` backend and test oracle's twin): padded layout, masks per step.

Same contract as every LSTM backend (see `fastinterest.ops.lstm`):

    forward(x, lengths, h0, c0, weights, has_bias, num_layers, bidirectional, batch_first, dropout,
            training, need_ws) -> (out, h_n, c_n, ws: list[Tensor])
    backward(grad_out, grad_hn, grad_cn, x, lengths, h0, c0, weights, has_bias, out, ws, num_layers,
             bidirectional, batch_first, dropout) -> (grad_x, grad_h0, grad_c0, grad_weights)
    ws_shapes(B, T, E, H, num_layers, dirs, dropout_active, need_ws) -> list of shapes

x: [B, T, E] (batch_first) or [T, B, E]; lengths: int64 [B] on the CPU, each in [0, T]; h0/c0:
[num_layers * dirs, B, H] or None (zeros); weights: torch.nn.LSTM's flat order (per layer, per
direction: w_ih [4H, in], w_hh [4H, H], then b_ih, b_hh [4H] if has_bias), gates i, f, g, o.
Outputs past a sequence's length are zero; h_n/c_n hold each sequence's state after its last valid
step (h0/c0 for length 0). A reverse direction runs each sequence backwards from its last valid step.

The reference keeps only the dropout masks between layers; backward recomputes the forward.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor


def layer_weights(weights, has_bias: bool, num_layers: int, dirs: int):
    """[[(w_ih, w_hh, b_ih, b_hh) per direction] per layer]; biases None without bias."""
    per = 4 if has_bias else 2
    out = []
    for layer in range(num_layers):
        row = []
        for d in range(dirs):
            w = weights[(layer * dirs + d) * per:(layer * dirs + d + 1) * per]
            row.append((w[0], w[1], w[2] if has_bias else None, w[3] if has_bias else None))
        out.append(row)
    return out


def ws_shapes(B: int, T: int, E: int, H: int, num_layers: int, dirs: int, dropout_active: bool,
              need_ws: bool) -> List[List[int]]:
    if not need_ws or not dropout_active:
        return []
    return [[B, T, dirs * H] for _ in range(num_layers - 1)]


def _reverse_index(lengths: Tensor, T: int, device) -> Tensor:
    """[B, T] index: t -> L-1-t inside each sequence, t elsewhere (an involution)."""
    t = torch.arange(T, device=device).unsqueeze(0)
    L = lengths.to(device).unsqueeze(1)
    return torch.where(t < L, L - 1 - t, t)


def _flip(x: Tensor, rev: Tensor) -> Tensor:
    """x [B, T, F] reversed along time within each sequence."""
    return x.gather(1, rev.unsqueeze(2).expand(-1, -1, x.shape[2]))


def _run_direction(xin: Tensor, mask: Tensor, w_ih, w_hh, b_ih, b_hh, h, c, save: bool):
    """xin [B, T, in] (already reversed for a reverse direction); mask [B, T] bool."""
    B, T, _ = xin.shape
    H = w_hh.shape[1]
    xproj = torch.matmul(xin, w_ih.t())
    if b_ih is not None:
        xproj = xproj + (b_ih + b_hh)
    outs, saved = [], []
    for t in range(T):
        m = mask[:, t].unsqueeze(1)
        gates = xproj[:, t] + h @ w_hh.t()
        i, f, g, o = gates.split(H, 1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c + i * g
        h_new = o * torch.tanh(c_new)
        if save:
            saved.append((i, f, g, o, c, h, c_new))
        outs.append(torch.where(m, h_new, torch.zeros_like(h_new)))
        h = torch.where(m, h_new, h)
        c = torch.where(m, c_new, c)
    out = torch.stack(outs, 1) if outs else xin.new_zeros(B, 0, H)
    return out, h, c, saved


def _prepare(x, lengths, batch_first):
    xb = x if batch_first else x.transpose(0, 1)
    B, T = xb.shape[0], xb.shape[1]
    lengths = lengths.to(device=x.device, dtype=torch.int64)
    mask = torch.arange(T, device=x.device).unsqueeze(0) < lengths.unsqueeze(1)
    return xb, B, T, lengths, mask


def forward(x: Tensor, lengths: Tensor, h0: Optional[Tensor], c0: Optional[Tensor], weights: List[Tensor],
            has_bias: bool, num_layers: int, bidirectional: bool, batch_first: bool, dropout: float,
            training: bool, need_ws: bool):
    xb, B, T, lengths, mask = _prepare(x, lengths, batch_first)
    dirs = 2 if bidirectional else 1
    H = weights[1].shape[1]
    lw = layer_weights(weights, has_bias, num_layers, dirs)
    rev = _reverse_index(lengths, T, x.device) if bidirectional else None
    h_n, c_n, ws = [], [], []
    layer_in = xb
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            h = h0[k] if h0 is not None else xb.new_zeros(B, H)
            c = c0[k] if c0 is not None else xb.new_zeros(B, H)
            xin = _flip(layer_in, rev) if d == 1 else layer_in
            out, hN, cN, _ = _run_direction(xin, mask, *lw[layer][d], h, c, save=False)
            outs.append(_flip(out, rev) if d == 1 else out)
            h_n.append(hN)
            c_n.append(cN)
        layer_out = torch.cat(outs, 2) if dirs == 2 else outs[0]
        if layer < num_layers - 1 and dropout > 0 and training:
            m = torch.empty_like(layer_out).bernoulli_(1 - dropout).div_(1 - dropout)
            if need_ws:
                ws.append(m)
            layer_out = layer_out * m
        layer_in = layer_out
    out = layer_in if batch_first else layer_in.transpose(0, 1)
    return out.contiguous(), torch.stack(h_n), torch.stack(c_n), ws


def backward(grad_out: Optional[Tensor], grad_hn: Optional[Tensor], grad_cn: Optional[Tensor], x: Tensor, lengths: Tensor,
             h0: Optional[Tensor], c0: Optional[Tensor], weights: List[Tensor], has_bias: bool, out: Tensor,
             ws: List[Tensor], num_layers: int, bidirectional: bool, batch_first: bool, dropout: float):
    xb, B, T, lengths, mask = _prepare(x, lengths, batch_first)
    dirs = 2 if bidirectional else 1
    H = weights[1].shape[1]
    lw = layer_weights(weights, has_bias, num_layers, dirs)
    rev = _reverse_index(lengths, T, x.device) if bidirectional else None
    masks = list(ws)
    # Recompute the forward, keeping every layer's input and every step's cell values.
    inputs, saved = [], []
    layer_in = xb
    for layer in range(num_layers):
        inputs.append(layer_in)
        outs, sv = [], []
        for d in range(dirs):
            k = layer * dirs + d
            h = h0[k] if h0 is not None else xb.new_zeros(B, H)
            c = c0[k] if c0 is not None else xb.new_zeros(B, H)
            xin = _flip(layer_in, rev) if d == 1 else layer_in
            o, _, _, s = _run_direction(xin, mask, *lw[layer][d], h, c, save=True)
            outs.append(_flip(o, rev) if d == 1 else o)
            sv.append(s)
        saved.append(sv)
        layer_out = torch.cat(outs, 2) if dirs == 2 else outs[0]
        if layer < num_layers - 1 and dropout > 0 and masks:
            layer_out = layer_out * masks[layer]
        layer_in = layer_out

    gw: List[Optional[Tensor]] = [None] * len(weights)
    per = 4 if has_bias else 2
    grad_h0 = xb.new_zeros(num_layers * dirs, B, H)
    grad_c0 = xb.new_zeros(num_layers * dirs, B, H)
    if grad_out is None:
        grad_out = out.new_zeros(out.shape)
    g_above = grad_out if batch_first else grad_out.transpose(0, 1)
    fmask = mask.to(xb.dtype)
    for layer in reversed(range(num_layers)):
        xin_layer = inputs[layer]
        dx = torch.zeros_like(xin_layer)
        for d in range(dirs):
            k = layer * dirs + d
            w_ih, w_hh, _, _ = lw[layer][d]
            go = g_above[..., d * H:(d + 1) * H]
            if d == 1:
                go = _flip(go, rev)
                xin = _flip(xin_layer, rev)
            else:
                xin = xin_layer
            dh = grad_hn[k].clone() if grad_hn is not None else xb.new_zeros(B, H)
            dc = grad_cn[k].clone() if grad_cn is not None else xb.new_zeros(B, H)
            dgates_all = xb.new_zeros(B, T, 4 * H)
            dw_hh = torch.zeros_like(w_hh)
            for t in reversed(range(T)):
                i, f, g, o, c_prev, h_prev, c_new = saved[layer][d][t]
                m = mask[:, t].unsqueeze(1)
                mf = fmask[:, t].unsqueeze(1)
                dht = dh + go[:, t] * mf
                tc = torch.tanh(c_new)
                dct = dc + dht * o * (1 - tc * tc)
                dgates = torch.cat([dct * g * i * (1 - i), dct * c_prev * f * (1 - f), dct * i * (1 - g * g),
                                    dht * tc * o * (1 - o)], 1) * mf
                dgates_all[:, t] = dgates
                dw_hh += dgates.t() @ h_prev
                dh = torch.where(m, dgates @ w_hh, dh)
                dc = torch.where(m, dct * f, dc)
            grad_h0[k] = dh
            grad_c0[k] = dc
            flat = dgates_all.reshape(-1, 4 * H)
            gw[k * per] = flat.t() @ xin.reshape(-1, xin.shape[2])
            gw[k * per + 1] = dw_hh
            if has_bias:
                gb = flat.sum(0)
                gw[k * per + 2] = gb
                gw[k * per + 3] = gb.clone()
            dxd = dgates_all @ w_ih
            dx = dx + (_flip(dxd, rev) if d == 1 else dxd)
        if layer > 0:
            g_above = dx * masks[layer - 1] if (dropout > 0 and masks) else dx
        else:
            g_above = dx
    grad_x = g_above if batch_first else g_above.transpose(0, 1)
    return grad_x.contiguous(), grad_h0, grad_c0, gw
