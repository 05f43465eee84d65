"""Classification sub-package: CIFAR-100 / ImageNet distillation on the shared DeepKD core."""
