//! AdamW over the adapter tensors, with the state kept in plain tensors (so it can be saved and
//! restored), and global gradient-norm clipping.

use tch::Tensor;

/// Decoupled-weight-decay Adam, with torch.optim.AdamW's update rule.
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Updates applied so far.
    pub step: u64,
    /// First and second moments, one pair per parameter.
    pub moments: Vec<(Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(params: &[Tensor], beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> AdamW {
        let moments = params.iter().map(|p| (p.zeros_like().detach(), p.zeros_like().detach())).collect();
        AdamW { beta1, beta2, eps, weight_decay, step: 0, moments }
    }

    /// Applies one update with learning rate `lr` to `params` from their `.grad()`.
    pub fn update(&mut self, params: &mut [Tensor], lr: f64) {
        self.step += 1;
        let t = self.step as i32;
        let (bias1, bias2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        tch::no_grad(|| {
            for (p, (m, v)) in params.iter_mut().zip(self.moments.iter_mut()) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let _ = m.g_mul_scalar_(self.beta1);
                let _ = m.g_add_(&(&g * (1.0 - self.beta1)));
                let _ = v.g_mul_scalar_(self.beta2);
                let _ = v.g_add_(&(&g * &g * (1.0 - self.beta2)));
                if self.weight_decay != 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                let denom = v.sqrt() / bias2.sqrt() + self.eps;
                let _ = p.g_sub_(&(&*m / denom * (lr / bias1)));
            }
        });
    }
}

/// The global L2 norm of all gradients (fp32 scalar tensor; no host sync).
pub fn grad_norm(params: &[Tensor]) -> Tensor {
    let squares: Vec<Tensor> = params
        .iter()
        .map(|p| p.grad())
        .filter(|g| g.defined())
        .map(|g| g.square().sum(tch::Kind::Float))
        .collect();
    if squares.is_empty() {
        return Tensor::from(0f32);
    }
    Tensor::stack(&squares, 0).sum(tch::Kind::Float).sqrt()
}

/// Scales all gradients so that their global norm is at most `max_norm` (torch's
/// `clip_grad_norm_`, with its 1e-6 guard). `norm` is the value from [`grad_norm`].
pub fn clip_grads(params: &[Tensor], norm: &Tensor, max_norm: f64) {
    let factor = (Tensor::from(max_norm as f32).to_device(norm.device()) / (norm + 1e-6)).clamp_max(1.0);
    tch::no_grad(|| {
        for p in params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.g_mul_(&factor);
            }
        }
    });
}

/// Zeroes gradients between optimizer steps.
pub fn zero_grads(params: &[Tensor]) {
    for p in params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}
