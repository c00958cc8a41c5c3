"""testkit/scenes.py, under the name the tests have always imported it by (bench/ imports
testkit directly: bench must not import tests)."""

from testkit.scenes import (  # noqa: F401
    MARGIN,
    ORL,
    Box,
    identity_rng,
    in_photo,
    paste,
    photo_set,
    two_faces,
)
