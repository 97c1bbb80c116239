"""The sender: collecting its latents (`collect`), and the compression stage that teaches it to speak in K latents (`model`, `trainer`, `train`)."""
