"""testkit/harness.py, under the name the tests have always imported it by (bench/ imports
testkit directly: bench must not import tests)."""

from testkit.harness import (  # noqa: F401
    ORL,
    ROOT,
    SHARED_DATA,
    RedisServer,
    Service,
    accuracy,
    free_port,
    identify_all,
    orl_chips,
    orl_folder,
    orl_split,
    post_dataset,
    rank_processes,
    redis_binary,
    top_identity,
    upload,
    wait_dataset,
    wait_job,
    wait_port,
    wait_status,
    zip_of,
)
