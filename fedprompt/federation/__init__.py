"""The runtime-neutral federation: what the in-process simulation and a Flower deployment share."""
