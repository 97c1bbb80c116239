"""How the actor is trained: the `Trainer` subclass (the three branches and the loss in `compute_loss`), the latent head's warm start, and the fused loss's Triton kernel."""
