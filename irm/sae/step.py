"""The paper's ReLU SAE training step (appendix D, eq. 8) with its gradients written out: the same loss and
gradients as autograd through irm.sae.model, in fewer passes over the [rows, features] codes."""

from __future__ import annotations

import torch


class ReluSAEStep(torch.autograd.Function):
    """sae_loss of a ReLU SAE whose encoder reads x unshifted (SparseAutoencoder.pre_activations, codes_from_pre,
    decode_normalized, then sae_loss), with its gradients written out: the same maths as autograd through those
    functions, in fewer passes over the [rows, features] codes, which at large batches cost as much as a GEMM's
    worth and at small ones dominate what is not GEMM. The ReLU runs in place; one per-feature sum of the codes gives
    both the L1 term and which features fired (codes are >= 0: a feature fired iff its sum is > 0); backward adds the
    L1 gradient and applies the ReLU's mask in place on the decoder's gradient, and accumulates a tied matrix's two
    gradient terms into one buffer (autograd would add a transposed copy of one to the other).

    apply(x_n, W_dec, W_enc or None (tied), b_enc, b_dec, l1_coefficient) -> (loss, x_hat_n, codes, code sums per
    feature); only the loss is differentiable, and x_n gets no gradient (activations are data)."""

    @staticmethod
    def forward(ctx, x_BD, W_dec, W_enc, b_enc, b_dec, l1_coefficient: float):
        loss, x_hat_BD, codes_BF, code_sums_F, err_BD = relu_step_forward(x_BD, W_dec, W_enc, b_enc, b_dec,
                                                                          l1_coefficient)
        ctx.save_for_backward(x_BD, W_dec, W_enc, codes_BF, err_BD)
        ctx.l1_coefficient = l1_coefficient
        ctx.mark_non_differentiable(x_hat_BD, codes_BF, code_sums_F)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the three outputs above
        return loss, x_hat_BD, codes_BF, code_sums_F

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if grad_loss is None:
            return None, None, None, None, None, None
        return (None, *relu_step_grads(*ctx.saved_tensors, ctx.l1_coefficient, grad_loss), None)


def relu_step_forward(x_BD, W_dec, W_enc, b_enc, b_dec, l1_coefficient: float):
    """ReluSAEStep's forward: (loss, x_hat, codes, code sums per feature, reconstruction error)."""
    codes_BF = torch.addmm(b_enc, x_BD, W_dec.t() if W_enc is None else W_enc).relu_()
    x_hat_BD = torch.addmm(b_dec, codes_BF, W_dec)
    err_BD = x_hat_BD - x_BD
    code_sums_F = codes_BF.sum(dim=0)
    flat = err_BD.view(-1)
    loss = torch.dot(flat, flat) / flat.numel() + l1_coefficient * (code_sums_F.sum() / x_BD.shape[0])
    return loss, x_hat_BD, codes_BF, code_sums_F, err_BD


def relu_step_grads(x_BD, W_dec, W_enc, codes_BF, err_BD, l1_coefficient: float, grad_loss):
    """ReluSAEStep's backward: the gradients of (W_dec, W_enc or None, b_enc, b_dec), `grad_loss` times those of
    the loss; it writes in place only into buffers it allocates."""
    rows = x_BD.shape[0]
    grad_x_hat_BD = err_BD * (grad_loss * (2.0 / err_BD.numel()))  # of the MSE
    # Through the decoder, plus the L1 term's l1_coefficient / rows on every code, zero where the ReLU cut.
    grad_pre_BF = torch.mm(grad_x_hat_BD, W_dec.t()).add_(grad_loss * (l1_coefficient / rows))
    grad_pre_BF = torch.ops.aten.threshold_backward.grad_input(grad_pre_BF, codes_BF, 0, grad_input=grad_pre_BF)
    if W_enc is None:
        grad_W_dec = torch.mm(grad_pre_BF.t(), x_BD).addmm_(codes_BF.t(), grad_x_hat_BD)
        grad_W_enc = None
    else:
        grad_W_dec = torch.mm(codes_BF.t(), grad_x_hat_BD)
        grad_W_enc = torch.mm(x_BD.t(), grad_pre_BF)
    return grad_W_dec, grad_W_enc, grad_pre_BF.sum(dim=0), grad_x_hat_BD.sum(dim=0)
