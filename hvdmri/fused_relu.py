"""XLA-compiled ReLU kernels for ResNet-50 training in mixed_bfloat16.

TensorFlow 2.15 runs convolutions and batch normalization through oneDNN, which
uses AMX for bfloat16. Element-wise ops such as ReluGrad, Relu and Add run in
Eigen, which the pip build of TensorFlow compiles without AVX-512 ("To enable the
following instructions: AVX2 AVX512F ... rebuild TensorFlow", as it logs at
start). XLA compiles the same element-wise work for the CPU it runs on, so this
module moves it there and leaves the convolutions and batch normalization to
oneDNN. A bf16 training step at 224 px then took 5-15% less time at batch 8 to
16 (`--no-fused-relu` in docs/BENCHMARKS.md):

- The gradient of every ReLU after a batch normalization becomes one XLA kernel.
  The forward ReLU stays a plain op, so TensorFlow still fuses it into the batch
  normalization.
- Each residual Add and the ReLU after it become one XLA kernel forward and one
  backward.

The layers keep their classes, configuration and weights. Only their call
changes, in this process, so checkpoints and the saved model are the same as
without it. In float32 the same kernels made a step slower (measured at batch
16), so hvdmri uses them only in bf16.

TODO: the gradient of a block's output still sums its two branches (shortcut and
convolution) in an Eigen AddN before the ReLU gradient. Fusing that sum into the
ReLU gradient needs a ResNet-50 whose block output is two tensors, one per branch.
"""

from __future__ import annotations

import tensorflow as tf


@tf.function(jit_compile=True)
def _relu_grad(dy: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    # Multiplies like TensorFlow's ReluGrad, so a NaN gradient stays NaN.
    return dy * tf.cast(y > 0, dy.dtype)


@tf.function(jit_compile=True)
def _add_relu(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    return tf.nn.relu(a + b)


@tf.custom_gradient
def relu(x: tf.Tensor):
    """ReLU whose gradient is one XLA kernel."""
    y = tf.nn.relu(x)

    def grad(dy):
        return _relu_grad(dy, y)

    return y, grad


@tf.custom_gradient
def add_relu(a: tf.Tensor, b: tf.Tensor):
    """relu(a + b) as one XLA kernel, with a one-kernel gradient."""
    y = _add_relu(a, b)

    def grad(dy):
        dx = _relu_grad(dy, y)
        return dx, dx

    return y, grad


def _is_relu(layer: tf.keras.layers.Layer) -> bool:
    return isinstance(layer, tf.keras.layers.Activation) and layer.activation is tf.keras.activations.relu


def _only_consumer(layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer | None:
    consumers = [node.outbound_layer for node in layer.outbound_nodes]
    return consumers[0] if len(consumers) == 1 else None


def use_fused_relu(model: tf.keras.Model) -> int:
    """Switch the model's ReLU layers to the XLA kernels and return how many layers changed.

    An Add whose only consumer is a ReLU layer then computes relu(a + b) itself, and
    that ReLU layer passes its input through. A model without such layers is left as
    it is.
    """
    changed = 0
    merged = set()
    for layer in model.layers:
        consumer = _only_consumer(layer)
        if (isinstance(layer, tf.keras.layers.Add) and len(layer.input) == 2 and consumer is not None
                and _is_relu(consumer)):
            layer.call = lambda inputs: add_relu(inputs[0], inputs[1])
            consumer.call = tf.identity
            merged.add(consumer.name)
            changed += 2
    for layer in model.layers:
        if _is_relu(layer) and layer.name not in merged:
            layer.call = relu
            changed += 1
    return changed
