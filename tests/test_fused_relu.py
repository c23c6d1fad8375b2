"""XLA ReLU kernels for bf16: the numbers of TensorFlow's own kernels, the same model on disk."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_module
from hvdmri.fused_relu import use_fused_relu
from hvdmri.model import build_model


@pytest.fixture
def bf16_policy():
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    yield
    tf.keras.mixed_precision.set_global_policy("float32")


def is_fused(layer) -> bool:
    # use_fused_relu replaces a layer's call on the instance, not on its class.
    return "call" in vars(layer)


def loss_and_gradients(model, images, labels):
    @tf.function
    def step():
        with tf.GradientTape() as tape:
            probabilities = model(images, training=True)
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(labels, probabilities))
        return loss, tape.gradient(loss, model.trainable_variables)

    loss, gradients = step()
    return float(loss), [gradient.numpy().astype(np.float32) for gradient in gradients]


def test_fused_covers_every_relu_and_add(bf16_policy):
    model = build_model(4, 32, weights=None, fused_relu=False)
    # ResNet-50: 16 residual blocks, each an Add followed by a ReLU, plus 33 ReLUs
    # after batch normalization (the stem and two per block).
    assert use_fused_relu(model) == 16 * 2 + 33
    assert is_fused(model.get_layer("conv2_block1_add"))
    assert is_fused(model.get_layer("conv5_block3_out"))
    assert is_fused(model.get_layer("conv1_relu"))
    # The head's ReLU belongs to its Dense layer, which keeps TensorFlow's kernel.
    assert not is_fused(model.get_layer("head_dense"))


def test_fused_by_default_only_in_bf16(bf16_policy):
    assert is_fused(build_model(4, 32, weights=None).get_layer("conv3_block2_add"))
    tf.keras.mixed_precision.set_global_policy("float32")
    assert not is_fused(build_model(4, 32, weights=None).get_layer("conv3_block2_add"))


def test_fused_same_loss_and_gradients(bf16_policy):
    tf.keras.utils.set_random_seed(5)
    plain = build_model(4, 64, weights=None, fused_relu=False)
    fused = build_model(4, 64, weights=None, fused_relu=True)
    fused.set_weights(plain.get_weights())
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(size=(4, 64, 64, 3)), tf.float32)
    labels = tf.constant([0, 1, 2, 3])

    plain_loss, plain_gradients = loss_and_gradients(plain, images, labels)
    fused_loss, fused_gradients = loss_and_gradients(fused, images, labels)
    assert fused_loss == pytest.approx(plain_loss, rel=1e-3)
    assert len(fused_gradients) == len(plain_gradients) == len(plain.trainable_variables)
    for variable, expected, actual in zip(plain.trainable_variables, plain_gradients, fused_gradients):
        # Both compute in bf16 and the masks are the same, so only the order of
        # float additions may differ: allow a small share of the gradient's scale.
        scale = float(np.abs(expected).max()) or 1.0
        np.testing.assert_allclose(actual, expected, rtol=0, atol=0.02 * scale, err_msg=variable.name)


def test_fused_model_saves_as_plain_keras(bf16_policy, tmp_path):
    plain = build_model(4, 32, weights=None, fused_relu=False)
    fused = build_model(4, 32, weights=None, fused_relu=True)
    assert fused.to_json() == plain.to_json()
    path = tmp_path / "model.keras"
    fused.save(str(path))
    # No custom objects: any Keras loads it, and it computes as the fused model.
    loaded = tf.keras.models.load_model(str(path), compile=False)
    images = tf.random.stateless_uniform((2, 32, 32, 3), seed=(1, 2))
    np.testing.assert_allclose(loaded(images).numpy(), fused(images).numpy(), atol=1e-6)


def relu_grad_calls(flags: list[str], tmp_path) -> float:
    """Return the ReluGrad calls in one bf16 model.fit step, as hvdmri.bench.ops counts them."""
    completed = run_module(["hvdmri.bench.ops", "--precision", "mixed_bfloat16", "--image-size", "32",
                            "--batch-size", "2", "--warmup-steps", "1", "--steps", "1", "--top", "500", *flags],
                           cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-2000:]
    rows = [line.split("|") for line in completed.stdout.splitlines() if line.startswith("| ")]
    calls = {row[1].strip(): row[3].strip() for row in rows}
    assert "_MklNativeConv2DBackpropFilterWithBias" in calls
    return float(calls.get("ReluGrad", 0))


def test_training_step_uses_xla_relu_gradients(tmp_path):
    # Only the head's Dense ReLU keeps TensorFlow's ReluGrad. The 49 of the base
    # come back with --no-fused-relu.
    assert relu_grad_calls([], tmp_path) == 1
    assert relu_grad_calls(["--no-fused-relu"], tmp_path) == 50
