"""DDIM sampling, clean-fid FID/KID and the report (`python -m eval`)."""
