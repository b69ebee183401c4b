"""The synthetic(alpha, beta) federated dataset of FedProx, in pFedMe's variant.

Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith, "Federated Optimization in
Heterogeneous Networks" (MLSys 2020), Section 5.1: client k draws

  u_k ~ N(0, alpha),  W_k ~ N(u_k, 1) [d, C],  b_k ~ N(u_k, 1) [C],
  B_k ~ N(0, beta),   v_k ~ N(B_k, 1) [d],     x ~ N(v_k, Sigma),
  Sigma = diag(j^-1.2) (j = 1..d),  y = argmax(softmax(x W_k + b_k)),

with d = 60 features and C = 10 classes; alpha and beta are standard
deviations. Client sizes follow a power law. This module follows, step for
step, the 100-user generator of pFedMe (Dinh, Tran & Nguyen, NeurIPS 2020):
`data/Synthetic/generate_synthetic_05_05.py` in github.com/CharlieDinh/pFedMe
(read here from the copy at dual-grp/pFedMe commit 874d63b; also in
CharlieDinh/pFedMe at commit 599cbf4 as
`data/Logistic_Synthetic/generate_synthetic_05_05.py`), which draws

  samples_per_user = (np.random.lognormal(4, 2, NUM_USER).astype(int) + 50) * 5

and then, in this order, u_k for all users, B_k for all users, v_k per
user, and per user W_k, b_k and the samples. Differences, none of which
changes the distribution: numpy's `Generator` seeded by `seed` replaces the
global legacy RNG (so the draws are not those of `np.random.seed(0)`),
x ~ N(v_k, Sigma) is drawn as v_k + z * sqrt(diag(Sigma)) instead of through
`multivariate_normal`, and the labels are computed for all of a client's
samples at once (argmax of the logits, which equals argmax of the softmax).
The reference's own 90/10 train/test split is left to
`partition.split_train_test`.

Note (a property of the reference, kept): u_k shifts every entry of W_k and
b_k alike, which adds u_k * (sum(x) + 1) to every class's logit, so alpha
leaves the labels unchanged (up to floating-point ties); heterogeneity across
clients comes from beta (through B_k) and from the per-client W_k, b_k, v_k.
"""

import numpy as np

# pFedMe's sizes: (floor(LogNormal(4, 2)) + 50) * 5 samples per client.
_SIZE_LOG_MEAN = 4.0
_SIZE_LOG_SIGMA = 2.0
_SIZE_OFFSET = 50
_SIZE_SCALE = 5
_COVARIANCE_EXPONENT = -1.2  # Sigma_jj = j^-1.2


def synthetic(
    alpha: float,
    beta: float,
    num_clients: int = 100,
    num_features: int = 60,
    num_classes: int = 10,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
  """Generates the synthetic(alpha, beta) dataset with power-law clients.

  Args:
    alpha: standard deviation of u_k, the mean of the client's W_k and b_k.
    beta: standard deviation of B_k, the mean of the client's feature means.
    num_clients: number of clients (pFedMe: 100).
    num_features: dimension d of x (FedProx: 60).
    num_classes: number of classes C (FedProx: 10).
    seed: seed of the numpy Generator; the output depends on nothing else.

  Returns:
    x: float32 [N, num_features] features of all clients, client by client.
    y: int32 [N] labels in 0..num_classes-1.
    client_indices: num_clients int64 arrays; client k owns
      x[client_indices[k]], a contiguous range of
      (floor(LogNormal(4, 2)) + 50) * 5 >= 250 samples.
  """
  if alpha < 0 or beta < 0:
    raise ValueError(
        f"alpha and beta are standard deviations and must be "
        f">= 0, got alpha={alpha}, beta={beta}"
    )
  for name, value, low in (
      ("num_clients", num_clients, 1),
      ("num_features", num_features, 1),
      ("num_classes", num_classes, 2),
  ):
    if value < low:
      raise ValueError(f"{name} must be >= {low}, got {value}")
  rng = np.random.default_rng(seed)
  sizes = (
      rng.lognormal(_SIZE_LOG_MEAN, _SIZE_LOG_SIGMA, num_clients).astype(
          np.int64
      )
      + _SIZE_OFFSET
  ) * _SIZE_SCALE  # [num_clients]
  mean_w = rng.normal(0.0, alpha, num_clients)  # u_k, [num_clients]
  mean_b = mean_w  # the reference uses u_k for b_k too
  feature_shift = rng.normal(0.0, beta, num_clients)  # B_k, [num_clients]
  # v_k, [num_clients, num_features]
  mean_x = rng.normal(feature_shift[:, None], 1.0, (num_clients, num_features))
  # sqrt(diag(Sigma)), [num_features]
  feature_std = np.arange(1, num_features + 1) ** (_COVARIANCE_EXPONENT / 2)

  xs, ys = [], []
  for k in range(num_clients):
    weights = rng.normal(mean_w[k], 1.0, (num_features, num_classes))
    bias = rng.normal(mean_b[k], 1.0, num_classes)  # [num_classes]
    noise = rng.standard_normal((sizes[k], num_features))
    x = mean_x[k] + noise * feature_std  # [n_k, num_features], float64
    xs.append(x.astype(np.float32))
    ys.append(np.argmax(x @ weights + bias, axis=1).astype(np.int32))
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  client_indices = [
      np.arange(start, stop) for start, stop in zip(offsets[:-1], offsets[1:])
  ]
  return np.concatenate(xs), np.concatenate(ys), client_indices
