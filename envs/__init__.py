"""Text-game environments for the closed loop: game generators, the game plumbing (`game`), the policies and the play loop (`play`), and the converter for ALFWorld's own data."""
