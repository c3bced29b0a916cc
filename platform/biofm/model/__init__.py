"""Models: the TTM encoder, masked signal modeling, classification, channel inflation."""
