"""medge training: data splits, tf.data pipelines, the malaria ResNet and the OCT model."""
