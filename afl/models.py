"""The Flax models every algorithm trains: LR, the [128, 64] MLP and the DCNN.

Section V-A of the paper (pfedacnnl.txt) uses three models:
  * multinomial logistic regression (one dense layer; softmax is in the loss),
  * a DNN with two hidden dense layers [128, 64] and ReLU,
  * a DCNN: Conv5x5x512-LeakyReLU-AvgPool2 - Conv3x3x1024-LeakyReLU-AvgPool2 -
    Conv3x3x2048-LeakyReLU - Conv3x3x2048-LeakyReLU - Dense(10), with a width
    multiplier here so that it fits a CPU.

Each model is a `LayerwiseNet`: a sequence of *stages*, each one trainable layer
(Dense or Conv, with bias) followed by fixed maps (activation, average pooling).
The analytic trainer walks the stages in order (`upto=l` returns the input of
trainable layer l) and writes ordinary Flax params (`layer_{l}/kernel`,
`layer_{l}/bias`) that `model.apply` and the gradient baselines use unchanged.
The gradient baselines draw their initial params as PyTorch's nn.Linear
and nn.Conv2d do, like their papers' code (`init_params(init="pytorch")`,
`pytorch_uniform`); Flax's defaults (lecun_normal kernels, zero biases) stay
the analytic algorithms' (each layer they solve overwrites its init) and an
option for the baselines.

DCNN head: flattening the last 8x8x2048 feature map gives a 131,072-wide input
to the dense layer, whose Gram matrix (eq. 5) would take 69 GB in float32. The
paper does not say how its head is fed; we average-pool the last feature map
globally (2048 features at full width), which keeps every layer's least-squares
problem at most 18,433 wide (the 3x3x2048 patches of the last conv layer).
"""

import math
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from afl import catalog

LEAKY_RELU_SLOPE = 0.01
GLOBAL_POOL = 0  # `Stage.pool` value: average over all spatial positions.


class Dense(NamedTuple):
  """A fully connected layer; its input is flattened first."""

  features: int


class Conv(NamedTuple):
  """A stride-1, 'SAME'-padded convolution with a square kernel."""

  features: int
  kernel_size: int


class Stage(NamedTuple):
  """One trainable layer and the fixed maps after it."""

  layer: Dense | Conv
  activation: str = "identity"  # one of ACTIVATIONS
  pool: int = 1  # average-pool window (= stride); 1: none; GLOBAL_POOL: global


ACTIVATIONS = {
    "identity": lambda x: x,
    "relu": nn.relu,
    "leaky_relu": lambda x: nn.leaky_relu(x, LEAKY_RELU_SLOPE),
}


def after_layer(stage: Stage, z: jax.Array) -> jax.Array:
  """The fixed maps f_l of eq. 2's recursion X_{l+1} = f_l(X_l W_l)."""
  z = ACTIVATIONS[stage.activation](z)
  if stage.pool == GLOBAL_POOL:
    return z.mean(axis=(1, 2))
  if stage.pool > 1:
    return nn.avg_pool(z, (stage.pool,) * 2, strides=(stage.pool,) * 2)
  return z


def layer_name(index: int) -> str:
  return f"layer_{index}"


class LayerwiseNet(nn.Module):
  """Trainable layers interleaved with fixed maps.

  Attributes:
    stages: the layers in order; the last stage's output is the logits.
    row_clip: None, or C: every trainable layer sees its input rows (a
      Dense layer's input, each of a Conv layer's patches) scaled down to
      norm <= C, as a differentially private analytic run trains them
      (`afl.privacy`); `upto` returns the layer's input before its own
      clipping.
  """

  stages: tuple[Stage, ...]
  row_clip: float | None = None

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      upto: int | None = None,
      encodings: Sequence[jax.Array] | None = None,
  ) -> jax.Array:
    """Forward pass.

    Args:
      x: [batch, *input_shape] float32.
      upto: if given, return the input of trainable layer `upto` (already
        flattened when that layer is Dense) instead of the logits.
      encodings: None, or Q_l [k_l, d_l] for every layer: then the params
        are factored, layer l is k_l wide and its output is multiplied by
        Q_l before the fixed maps: the layer W_l = P_l Q_l with P_l in the
        params (see `factored_layer`). Every layer that ACnnL solves has
        this form (eq. 5: W_l = (A_0 + gamma I)^-1 X^T Y Q_l, k_l = d_y),
        and the factored pass costs k_l / d_l of the full one (10 / 128 on
        MNIST-MLP's first layer).

    Returns:
      [batch, num_classes] logits, or the layer input.
    """
    for index, stage in enumerate(self.stages):
      if isinstance(stage.layer, Dense):
        x = x.reshape(x.shape[0], -1)
      if index == upto:
        return x
      layer = (
          stage.layer
          if encodings is None
          else factored_layer(stage.layer, encodings[index])
      )
      if self.row_clip is not None and isinstance(layer, Dense):
        x = x * _row_scale(jnp.sum(jnp.square(x), -1, keepdims=True), self)
      module = make_layer(layer, index)
      z = module(x)
      if self.row_clip is not None and isinstance(layer, Conv):
        # A patch scaled by s gives s (patch . kernel) + bias.
        bias = module.variables["params"]["bias"]
        z = (z - bias) * _row_scale(_patch_squares(x, layer), self) + bias
      if encodings is not None:
        z = z @ encodings[index].astype(z.dtype)
      x = after_layer(stage, z)
    if upto is not None:
      raise ValueError(
          f"upto={upto} but the model has {len(self.stages)} "
          "trainable layers"
      )
    return x


def _row_scale(squares: jax.Array, net: LayerwiseNet) -> jax.Array:
  """min(1, C / norm) of rows whose squared norms are `squares`."""
  norms = jnp.sqrt(squares)
  return jnp.minimum(1.0, net.row_clip / jnp.maximum(norms, 1e-30))


def _patch_squares(x: jax.Array, layer: Conv) -> jax.Array:
  """[B, H, W, 1] squared norm of every 'SAME' patch of x [B, H, W, C]."""
  k = layer.kernel_size
  ones = jnp.ones((k, k, x.shape[-1], 1), x.dtype)
  return jax.lax.conv_general_dilated(
      jnp.square(x),
      ones,
      (1, 1),
      "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )


def factored_layer(layer: Dense | Conv, encoding: jax.Array) -> Dense | Conv:
  """The layer P_l of W_l = P_l Q_l: `layer` with Q_l's k_l outputs."""
  return layer._replace(features=encoding.shape[0])


def make_layer(layer: Dense | Conv, index: int) -> nn.Module:
  if isinstance(layer, Dense):
    return nn.Dense(layer.features, name=layer_name(index))
  return nn.Conv(
      layer.features,
      (layer.kernel_size,) * 2,
      padding="SAME",
      name=layer_name(index),
  )


def logistic_regression(num_classes: int) -> LayerwiseNet:
  return LayerwiseNet((Stage(Dense(num_classes)),))


def mlp(num_classes: int, hidden: Sequence[int] = (128, 64)) -> LayerwiseNet:
  return LayerwiseNet(
      tuple(Stage(Dense(h), "relu") for h in hidden)
      + (Stage(Dense(num_classes)),)
  )


def dcnn(num_classes: int, width: float = 1.0) -> LayerwiseNet:
  """The paper's DCNN with every conv width multiplied by `width`."""

  def w(channels):
    return max(1, round(channels * width))

  return LayerwiseNet(
      (
          Stage(Conv(w(512), 5), "leaky_relu", pool=2),
          Stage(Conv(w(1024), 3), "leaky_relu", pool=2),
          Stage(Conv(w(2048), 3), "leaky_relu"),
          Stage(Conv(w(2048), 3), "leaky_relu", pool=GLOBAL_POOL),
          Stage(Dense(num_classes)),
      )
  )


MODELS = catalog.MODELS


def get_model(name: str, num_classes: int, width: float = 1.0) -> LayerwiseNet:
  """Looks a model up by its command-line name (`--model`)."""
  if name == "lr":
    return logistic_regression(num_classes)
  if name == "mlp":
    return mlp(num_classes)
  if name == "dcnn":
    return dcnn(num_classes, width)
  raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")


# How a trained model's params are first drawn (`init_params`).
INITS = catalog.INITS


def init_params(
    model: LayerwiseNet,
    key: jax.Array,
    input_shape: Sequence[int],
    encodings: Sequence[jax.Array] | None = None,
    init: str = "flax",
):
  """Params of `model` for inputs of shape [batch, *input_shape] (factored
  params with `encodings`, see `LayerwiseNet`), drawn by `init`: "flax"
  (Flax's defaults: lecun_normal kernels, zero biases) or "pytorch"
  (`pytorch_uniform`)."""

  def flax_init():
    return model.init(
        key, jnp.zeros((1, *input_shape), jnp.float32), encodings=encodings
    )

  if init == "flax":
    return flax_init()
  if init == "pytorch":
    return pytorch_uniform(jax.eval_shape(flax_init), key)
  raise ValueError(f"unknown init {init!r}; choose one of {INITS}")


def pytorch_uniform(params, key: jax.Array):
  """PyTorch's default init of `nn.Linear` and `nn.Conv2d`, over Flax
  params (arrays or shapes): every layer's kernel and bias drawn from
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in the layer's inputs per output
  (a Dense kernel [fan_in, out]; a Conv kernel [kh, kw, cin, cout]:
  kh kw cin). PyTorch's kaiming_uniform(a=sqrt(5)) kernel has exactly
  this bound.

  The baselines' papers' reference code is PyTorch (pFedMe's:
  CharlieDinh/pFedMe), and their step sizes were chosen with this init.
  With Flax's lecun_normal kernels instead (std 1/sqrt(fan_in), sqrt(3)
  times PyTorch's) and the [128, 64] MLP on MNIST standardized per pixel
  as the pFedMe authors' data files are ((x / 255 - mean) / (std + 0.001):
  rarely inked border pixels reach about 200), pFedMe's inner solver blows
  up in round 1 at the paper's settings, where the authors' code stays
  finite (tests/test_baselines.py).
  """
  layers = params["params"]
  keys = jax.random.split(key, len(layers))

  def draw(layer, layer_key):
    bound = 1.0 / math.sqrt(math.prod(layer["kernel"].shape[:-1]))
    leaf_keys = jax.random.split(layer_key, len(layer))
    return {
        name: jax.random.uniform(
            leaf_key, leaf.shape, leaf.dtype, -bound, bound
        )
        for (name, leaf), leaf_key in zip(sorted(layer.items()), leaf_keys)
    }

  return {
      "params": {
          name: draw(layer, layer_key)
          for (name, layer), layer_key in zip(sorted(layers.items()), keys)
      }
  }
