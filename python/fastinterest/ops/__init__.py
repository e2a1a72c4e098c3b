"""torch.library custom ops in the `fastinterest::` namespace (forward, backward, fake, autograd)."""
