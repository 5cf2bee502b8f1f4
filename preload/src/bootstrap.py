# Run by the preload library at the first audit event after start-up, LOCATION = the package directory
# holding the library: loads that picklegate (unless one is imported) and activates it from the host
# policy (HOST_POLICY, or None) and from the environment.
import os
import sys

sys.audit("picklegate.preload-check")
try:
    if "picklegate" not in sys.modules:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "picklegate", os.path.join(LOCATION, "__init__.py"), submodule_search_locations=[LOCATION]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules["picklegate"] = package
        try:
            spec.loader.exec_module(package)
        except BaseException:
            del sys.modules["picklegate"]
            raise
    from picklegate._activate import from_environment, from_host_policy
except Exception as error:
    lenient = HOST_POLICY is None and (os.environ.get("PICKLEGATE_MODE") or "enforce").strip().lower() in ("warn", "record", "off")
    sys.stderr.write(
        f"picklegate: cannot load picklegate from {LOCATION}: {error!r}\n"
        + ("picklegate: WARNING: this process runs UNGUARDED\n" if lenient else "picklegate: stopping, rather than run unguarded\n")
    )
    sys.stderr.flush()
    if not lenient:
        os._exit(78)
else:
    if HOST_POLICY is not None:
        from_host_policy(HOST_POLICY)
    if os.environ.get("PICKLEGATE_POLICY") or os.environ.get("PICKLEGATE_MODE"):
        from_environment()
