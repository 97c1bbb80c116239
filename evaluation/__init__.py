"""Does the actor read the latents? Conditions (true, shuffled, none, plan text), generation with a latent message, and the evaluation and inference command lines."""
