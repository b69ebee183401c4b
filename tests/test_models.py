"""The Flax models and their analytic view (afl.models, afl.layers).

The analytic trainer sees each trainable layer as rows @ W_l (eq. 1, 2 and
Fig. 1); these tests prove that view computes exactly what Flax computes with
the params `layers.to_params` writes, and pin the models' shapes and names.
"""

import functools

import jax
import numpy as np
import pytest

from afl import layers
from afl import models

DCNN_WIDTH = 1 / 64  # conv channels 512, 1024, 2048, 2048 -> 8, 16, 32, 32


def random_weights(rng, shape):
  """Float32-representable float64 weights, so to_params loses nothing."""
  return rng.standard_normal(shape).astype(np.float32).astype(np.float64)


def flax_layer(layer):
  return models.make_layer(layer, 0)


@functools.cache
def model_and_params(name, input_shape):
  model = models.get_model(name, 10, DCNN_WIDTH)
  return model, models.init_params(model, jax.random.key(0), input_shape)


def kernel_shapes(params):
  """{'layer_l': (kernel shape, bias shape)} of one model's params."""
  return {
      name: (p["kernel"].shape, p["bias"].shape)
      for name, p in params["params"].items()
  }


@pytest.mark.parametrize(
    "name,input_shape,expected",
    [
        ("lr", (28, 28, 1), {"layer_0": ((784, 10), (10,))}),
        (
            "mlp",
            (28, 28, 1),
            {
                "layer_0": ((784, 128), (128,)),
                "layer_1": ((128, 64), (64,)),
                "layer_2": ((64, 10), (10,)),
            },
        ),
        (
            "dcnn",
            (32, 32, 3),
            {
                "layer_0": ((5, 5, 3, 8), (8,)),
                "layer_1": ((3, 3, 8, 16), (16,)),
                "layer_2": ((3, 3, 16, 32), (32,)),
                "layer_3": ((3, 3, 32, 32), (32,)),
                "layer_4": ((32, 10), (10,)),
            },
        ),
    ],
)
def test_models_have_named_layers_and_logits(name, input_shape, expected):
  """layer_0..layer_{L-1}, HWIO conv kernels with the width applied, [B, 10]."""
  model, params = model_and_params(name, input_shape)
  assert kernel_shapes(params) == expected
  assert len(model.stages) == len(expected)
  x = np.random.default_rng(0).random((3,) + input_shape, np.float32)
  assert model.apply(params, x).shape == (3, 10)


def test_dcnn_width_multiplier_rounds_and_keeps_one_channel():
  features = [s.layer.features for s in models.dcnn(10, 0.1).stages]
  assert features == [51, 102, 205, 205, 10]
  features = [s.layer.features for s in models.dcnn(10, 1e-6).stages]
  assert features == [1, 1, 1, 1, 10]
  assert [s.layer.features for s in models.dcnn(10).stages] == [
      512,
      1024,
      2048,
      2048,
      10,
  ]


def test_unknown_model_names_the_valid_ones():
  with pytest.raises(ValueError, match=r"'resnet'.*'lr', 'mlp', 'dcnn'"):
    models.get_model("resnet", 10)


@pytest.mark.parametrize(
    "name,input_shape,fan_ins",
    [
        ("mlp", (28, 28, 1), [784, 128, 64]),
        (
            "dcnn",
            (32, 32, 3),
            [5 * 5 * 3, 3 * 3 * 8, 3 * 3 * 16, 3 * 3 * 32, 32],
        ),
    ],
)
def test_pytorch_init_draws_uniform_within_one_over_sqrt_fan_in(
    name, input_shape, fan_ins
):
  """PyTorch's nn.Linear / nn.Conv2d default: kernel and bias of layer l
  from U(-b, b), b = 1/sqrt(fan_in) (a conv's fan_in: kh kw cin), so a
  large kernel's std is b / sqrt(3)."""
  model = models.get_model(name, 10, DCNN_WIDTH)
  params = models.init_params(
      model, jax.random.key(0), input_shape, init="pytorch"
  )
  assert kernel_shapes(params) == kernel_shapes(
      model_and_params(name, input_shape)[1]
  )
  for index, fan_in in enumerate(fan_ins):
    layer = params["params"][models.layer_name(index)]
    bound = 1 / np.sqrt(fan_in)
    for leaf in layer.values():
      magnitude = np.abs(np.asarray(leaf))
      assert magnitude.max() <= bound and magnitude.max() > bound / 2
    kernel = np.asarray(layer["kernel"])
    if kernel.size >= 9000:
      assert kernel.std() == pytest.approx(bound / np.sqrt(3), rel=0.03)


def test_flax_init_keeps_flax_defaults_and_unknown_inits_are_named():
  model, default = model_and_params("mlp", (28, 28, 1))
  flax = models.init_params(model, jax.random.key(0), (28, 28, 1), init="flax")
  jax.tree.map(np.testing.assert_array_equal, flax, default)
  assert not np.asarray(flax["params"]["layer_0"]["bias"]).any()
  with pytest.raises(ValueError, match=r"'torch'.*'flax', 'pytorch'"):
    models.init_params(model, jax.random.key(0), (28, 28, 1), init="torch")


@pytest.mark.parametrize(
    "name,input_shape,expected",
    [
        ("lr", (28, 28, 1), [(784,)]),
        ("mlp", (28, 28, 1), [(784,), (128,), (64,)]),
        (
            "dcnn",
            (32, 32, 3),
            [(32, 32, 3), (16, 16, 8), (8, 8, 16), (8, 8, 32), (32,)],
        ),
    ],
)
def test_upto_returns_each_layers_input(name, input_shape, expected):
  """`upto=l` is the input of layer l: it reproduces the logits from there."""
  model, params = model_and_params(name, input_shape)
  x = np.random.default_rng(1).random((2,) + input_shape, np.float32)
  logits = model.apply(params, x)
  for index, shape in enumerate(expected):
    inputs = model.apply(params, x, upto=index)
    assert inputs.shape == (2,) + shape
    # Finish the forward pass from layer `index` by hand.
    for later, stage in enumerate(model.stages[index:], index):
      inputs = (
          inputs.reshape(2, -1)
          if isinstance(stage.layer, models.Dense)
          else inputs
      )
      layer_params = {"params": params["params"][models.layer_name(later)]}
      inputs = models.after_layer(
          stage, flax_layer(stage.layer).apply(layer_params, inputs)
      )
    np.testing.assert_allclose(inputs, logits, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="upto"):
    model.apply(params, x, upto=len(expected))


@pytest.mark.parametrize(
    "name,input_shape",
    [("lr", (28, 28, 1)), ("mlp", (28, 28, 1)), ("dcnn", (32, 32, 3))],
)
def test_factored_params_compute_the_full_model(name, input_shape):
  """Layers P_l followed by Q_l (`encodings`) == the model with W_l = P_l Q_l,
  logits and every layer's input; to_params with the encoding == of P Q."""
  model, full_params = model_and_params(name, input_shape)
  rng = np.random.default_rng(6)
  encodings = [
      rng.standard_normal((3, stage.layer.features)) for stage in model.stages
  ]
  factored_shapes = models.init_params(
      model, jax.random.key(0), input_shape, encodings
  )["params"]
  factored, full = {}, {}
  for index, stage in enumerate(model.stages):
    name_l = models.layer_name(index)
    channels = full_params["params"][name_l]["kernel"].shape[-2]
    width = factored_shapes[name_l]["kernel"].size // 3 + 1
    solution = random_weights(rng, (width, 3)) / np.sqrt(width)
    factored[name_l] = layers.to_params(
        models.factored_layer(stage.layer, encodings[index]), solution, channels
    )
    full[name_l] = layers.to_params(
        stage.layer, solution, channels, encodings[index]
    )
    expected = layers.to_params(
        stage.layer, solution @ encodings[index], channels
    )
    for key in ("kernel", "bias"):
      assert factored[name_l][key].shape == factored_shapes[name_l][key].shape
      np.testing.assert_allclose(
          full[name_l][key], expected[key], rtol=1e-6, atol=1e-6
      )
  x = rng.random((2,) + input_shape, np.float32)
  for upto in list(range(len(model.stages))) + [None]:
    np.testing.assert_allclose(
        model.apply({"params": factored}, x, upto=upto, encodings=encodings),
        model.apply({"params": full}, x, upto=upto),
        rtol=1e-4,
        atol=1e-5,
    )


LAYERS = [
    (models.Dense(7), (12,)),
    (models.Conv(4, 3), (6, 5, 1)),
    (models.Conv(4, 3), (6, 5, 3)),
    (models.Conv(5, 5), (7, 6, 1)),
    (models.Conv(5, 5), (7, 6, 3)),
]


@pytest.mark.parametrize("layer,input_shape", LAYERS)
def test_design_rows_times_weights_equals_flax(layer, input_shape):
  """rows @ W[:-1] + W[-1] == nn.Dense/nn.Conv with to_params(W)."""
  rng = np.random.default_rng(2)
  channels = input_shape[-1]
  d = layers.input_width(layer, input_shape)
  weights = random_weights(rng, (d, layer.features))
  x = rng.standard_normal((3,) + input_shape).astype(np.float32)
  rows = np.asarray(layers.design_rows(layer, x, mask=None))
  positions = 1 if isinstance(layer, models.Dense) else np.prod(input_shape[:2])
  assert rows.shape == (3, positions, d - 1)
  analytic = rows.astype(np.float64) @ weights[:-1] + weights[-1]
  flax_out = flax_layer(layer).apply(
      {"params": layers.to_params(layer, weights, channels)}, x
  )
  np.testing.assert_allclose(
      analytic,
      np.asarray(flax_out).reshape(3, positions, -1),
      rtol=1e-5,
      atol=1e-5,
  )


def test_design_rows_of_a_conv_are_channel_major_patches():
  """Row (i, j) of a 3x3 conv is the zero-padded patch, (C_in, kh, kw) order."""
  x = np.random.default_rng(3).standard_normal((1, 4, 5, 2))
  rows = np.asarray(layers.design_rows(models.Conv(1, 3), x, None))
  padded = np.pad(x[0], ((1, 1), (1, 1), (0, 0)))
  for i in range(4):
    for j in range(5):
      patch = padded[i : i + 3, j : j + 3].transpose(2, 0, 1).reshape(-1)
      np.testing.assert_array_equal(rows[0, i * 5 + j], patch)


@pytest.mark.parametrize("layer,input_shape", LAYERS)
def test_masked_rows_are_zero(layer, input_shape):
  x = np.random.default_rng(4).standard_normal((4,) + input_shape)
  mask = np.array([True, False, True, False])
  rows = np.asarray(layers.design_rows(layer, x, mask))
  unmasked = np.asarray(layers.design_rows(layer, x, None))
  assert not rows[~mask].any()
  np.testing.assert_array_equal(rows[mask], unmasked[mask])
  assert np.abs(unmasked[~mask]).sum() > 0


@pytest.mark.parametrize("layer,input_shape", LAYERS)
@pytest.mark.parametrize("lead", [(), (2,), (2, 3)])
def test_from_params_inverts_to_params(layer, input_shape, lead):
  """Also with stacked (group, client) axes, each slice converted alone."""
  channels = input_shape[-1]
  d = layers.input_width(layer, input_shape)
  weights = random_weights(np.random.default_rng(5), lead + (d, layer.features))
  params = layers.to_params(layer, weights, channels)
  one = layers.to_params(
      layer, weights.reshape((-1, d, layer.features))[0], channels
  )
  init = flax_layer(layer).init(
      jax.random.key(0), np.zeros((1,) + input_shape, np.float32)
  )
  for key in ("kernel", "bias"):
    assert params[key].dtype == np.float32
    assert params[key].shape == lead + init["params"][key].shape
    np.testing.assert_array_equal(
        np.asarray(params[key]).reshape((-1,) + one[key].shape)[0], one[key]
    )
  np.testing.assert_array_equal(layers.from_params(layer, params), weights)


def test_input_width_counts_the_bias():
  assert layers.input_width(models.Dense(10), (28, 28, 1)) == 785
  assert layers.input_width(models.Dense(10), (64,)) == 65
  assert layers.input_width(models.Conv(8, 5), (32, 32, 3)) == 76
  assert layers.input_width(models.Conv(8, 3), (16, 16, 8)) == 73


def test_after_layer_numerics():
  """relu, leaky_relu (slope 0.01), 2x2 average pool and global pool."""
  z = np.random.default_rng(6).standard_normal((2, 4, 6, 3))
  relu = np.maximum(z, 0)
  leaky = np.where(z > 0, z, 0.01 * z)
  cases = [
      (models.Stage(models.Conv(3, 3)), z),
      (models.Stage(models.Conv(3, 3), "relu"), relu),
      (models.Stage(models.Conv(3, 3), "leaky_relu"), leaky),
      (
          models.Stage(models.Conv(3, 3), "leaky_relu", pool=2),
          leaky.reshape(2, 2, 2, 3, 2, 3).mean(axis=(2, 4)),
      ),
      (
          models.Stage(models.Conv(3, 3), "relu", pool=models.GLOBAL_POOL),
          relu.mean(axis=(1, 2)),
      ),
  ]
  assert models.LEAKY_RELU_SLOPE == 0.01
  for stage, expected in cases:
    np.testing.assert_allclose(
        models.after_layer(stage, z), expected, rtol=1e-12, atol=0
    )
