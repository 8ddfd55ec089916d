"""`convlens lab`: the whole PW-11 lab, staged and cached, rendered as one self-contained HTML page."""
