"""One of the two processes of tests/test_multiprocess.py: ``python two_process_worker.py PORT ID``.

Joins a 2-process JAX cluster on localhost (CPU collectives over gloo, 2 simulated devices per
process, 4 in all), runs the highway step of ``helpers.sharded_mlp_problem`` data-parallel (the
batch over all 4 devices), layer-parallel (the 16 layers over all 4 devices, so the layer axis
spans both processes) and pipelined (the same, with the batch in 4 microbatches), and compares each
with the same step on one local device. Prints one
``ok ...`` line per check; any mismatch raises (exit code 1).
"""

import os
import sys


def main(port: str, process_id: int) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"  # before JAX starts
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)

    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import hbpjax
    from helpers import sharded_mlp_problem

    assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.device_count())
    loss, params, data = sharded_mlp_problem()  # the same values in both processes (fixed keys)
    params, data = jax.device_get((params, data))

    def global_array(a, mesh, spec):
        """``a`` (the same host value in every process) as an array over the whole mesh."""
        return jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda index: a[index])

    def check(name, got, expected):
        got = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), got)  # replicated: every process holds it all
        for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-6)
        print(f"ok {name} process {jax.process_index()}", flush=True)

    for k in (0, 2, 16):
        expected = jax.device_get(jax.jit(hbpjax.highway_value_and_grad(loss, (0, 1), iterations=k))(params, data))

        mesh = jax.make_mesh((4,), ("data",))
        step = jax.jit(hbpjax.highway_value_and_grad(loss, (0, 1), iterations=k), out_shardings=NamedSharding(mesh, P()))
        got = step(jax.tree.map(lambda a: global_array(a, mesh, P()), params), global_array(data, mesh, P("data")))
        check(f"data-parallel k={k}", got, expected)

        mesh = jax.make_mesh((4,), ("layers",))
        fn = hbpjax.highway_value_and_grad(lambda p, x, mesh=mesh: loss(p, x, layer_axis="layers", mesh=mesh), (0, 1), iterations=k)
        layered = jax.tree.map(lambda a: global_array(a, mesh, P("layers")), params)
        got = jax.jit(fn, out_shardings=NamedSharding(mesh, P()))(layered, global_array(data, mesh, P()))
        check(f"layer-parallel k={k}", got, expected)

        piped = lambda p, x, mesh=mesh: loss(p, x, layer_axis="layers", mesh=mesh, microbatches=4)
        fn = hbpjax.highway_value_and_grad(piped, (0, 1), iterations=k)
        got = jax.jit(fn, out_shardings=NamedSharding(mesh, P()))(layered, global_array(data, mesh, P()))
        check(f"pipelined k={k}", got, expected)


if __name__ == "__main__":  # pytest imports this module for its doctests: nothing may run then
    main(sys.argv[1], int(sys.argv[2]))
