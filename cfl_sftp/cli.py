"""The ``cfl-sftp`` command (SPEC 10). It parses arguments and calls the same services the server uses.

Exit codes: 0 on success, 1 on a refused input (one line on stderr), 2 on a usage error (argparse's own).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cfl_sftp import __version__
from cfl_sftp.config import ConfigError, GatewayLimits, default_config_path, load_config
from cfl_sftp.domain.errors import CflError, GatewayRejection, PolicyError
from cfl_sftp.domain.signature import load_signing_key

EXIT_OK = 0
EXIT_REFUSED = 1


class Refused(Exception):
    """A refused input: printed as one line on stderr, exit code 1."""


# -- helpers ---------------------------------------------------------------------------------------------


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config) if args.config else default_config_path()


def _open_deployment(args: argparse.Namespace, *, migrate: bool = False):  # type: ignore[no-untyped-def]
    from cfl_sftp.deployment import Deployment, KeyFileError
    from cfl_sftp.storage.db import SchemaError

    config = load_config(_config_path(args))
    try:
        deployment = Deployment.open(config)
        if migrate:
            deployment.db.upgrade()
        else:
            deployment.db.upgrade_if_empty()
    except (KeyFileError, SchemaError) as exc:
        raise Refused(str(exc)) from exc
    return deployment


# -- commands --------------------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from cfl_sftp.init import InitError, init_deployment

    try:
        path = init_deployment(Path(args.dir))
    except InitError as exc:
        raise Refused(str(exc)) from exc
    print(f"created {path}")
    print("next: add organisations, users and keys under policies/ (see docs/operating.md), then:")
    print(f"  cfl-sftp policy check --config {path}")
    print(f"  cfl-sftp serve --config {path}")
    return EXIT_OK


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from cfl_sftp.storage.db import Database

    config = load_config(_config_path(args))
    db = Database(config.database_url)
    try:
        before = db.current_revision()
        db.upgrade()
        after = db.current_revision()
    finally:
        db.dispose()
    print(f"database at revision {after}" + ("" if before == after else f" (was {before or 'empty'})"))
    return EXIT_OK


def cmd_package_build(args: argparse.Namespace) -> int:
    from cfl_sftp.domain.build import build_package

    try:
        fields = json.loads(Path(args.manifest).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Refused(f"cannot read manifest {args.manifest}: {exc}") from exc
    if not isinstance(fields, dict):
        raise Refused(f"{args.manifest} must hold a JSON object")
    try:
        key = load_signing_key(Path(args.key).read_bytes())
    except (OSError, ValueError) as exc:
        raise Refused(f"cannot use signing key {args.key}: {exc}") from exc
    image_path = Path(args.image)
    notes_path = Path(args.release_notes) if args.release_notes else None
    out_path = Path(args.output)
    tmp_path = out_path.with_name(f".{out_path.name}.tmp")
    try:
        with image_path.open("rb") as image, tmp_path.open("wb") as out:
            notes = notes_path.open("rb") if notes_path else None
            try:
                build_package(
                    out, fields, image, image_path.name, key,
                    release_notes=notes, release_notes_name=notes_path.name if notes_path else None,
                )
            finally:
                if notes is not None:
                    notes.close()
        tmp_path.replace(out_path)
    except (OSError, ValueError) as exc:
        tmp_path.unlink(missing_ok=True)
        raise Refused(f"cannot build package: {exc}") from exc
    print(f"wrote {out_path}")
    return EXIT_OK


def cmd_package_verify(args: argparse.Namespace) -> int:
    from cfl_sftp.domain.package import PackageLimits, PackageReader
    from cfl_sftp.domain.signature import verify_manifest_signature
    from cfl_sftp.policy.loader import load_manufacturer_keys

    limits = GatewayLimits()
    if args.keys:
        keys_dir = Path(args.keys)
    else:
        config = load_config(_config_path(args))
        limits = config.gateway
        keys_dir = config.policies_dir / "manufacturer-keys"
    reader = PackageReader(PackageLimits(limits.max_package_bytes, limits.max_release_notes_bytes))
    try:
        with Path(args.file).open("rb") as handle:
            while chunk := handle.read(1 << 20):
                reader.feed(chunk)
    except OSError as exc:
        raise Refused(f"cannot read {args.file}: {exc.strerror}") from exc
    try:
        package = reader.finish()
        try:
            keys = load_manufacturer_keys(keys_dir).get(package.manifest.device_model.manufacturer_id, ())
        except PolicyError as exc:
            raise Refused(f"cannot load manufacturer keys from {keys_dir}: {exc.errors[0]}") from exc
        verify_manifest_signature(package.manifest_bytes, package.signature, keys)
    except GatewayRejection as exc:
        print(f"rejected: {exc.reason.value}: {exc.public_message}")
        print(exc.reason.value, file=sys.stderr)
        return EXIT_REFUSED
    m = package.manifest
    print(
        f"ok: {m.device_type.value} {m.device_model} firmware {m.firmware_version} "
        f"({m.image.name}, {m.image.size} bytes, sha256 {m.image.sha256})"
    )
    return EXIT_OK


def cmd_policy_check(args: argparse.Namespace) -> int:
    from cfl_sftp.policy import load_policy_set

    directory = Path(args.dir) if args.dir else load_config(_config_path(args)).policies_dir
    try:
        snapshot = load_policy_set(directory)
    except PolicyError as exc:
        for problem in exc.errors:
            print(str(problem), file=sys.stderr)
        return EXIT_REFUSED
    print(f"policy set valid: {len(snapshot.users)} user(s), digest {snapshot.digest}")
    return EXIT_OK


def cmd_library_list(args: argparse.Namespace) -> int:
    from cfl_sftp.storage.library_repo import LibraryRepository, image_ref

    deployment = _open_deployment(args)
    try:
        with deployment.db.reading() as session:
            rows = LibraryRepository(session).images()
            items = [
                {
                    "path": image_ref(r).path,
                    "sha256": r.sha256,
                    "size": r.size,
                    "device_type": r.device_type,
                    "manufacturer_id": r.manufacturer_id,
                    "model_id": r.model_id,
                    "hardware_version": r.hardware_version,
                    "firmware_version": r.firmware_version,
                    "purpose": r.purpose,
                    "upload_id": r.upload_id,
                    "added_at": r.added_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "retired": r.retired,
                }
                for r in rows
            ]
    finally:
        deployment.close()
    if args.json:
        print(json.dumps(items, indent=2))
    elif not items:
        print("the library is empty")
    else:
        for item in items:
            flag = "  (retired)" if item["retired"] else ""
            print(f"{item['path']}  {item['size']} bytes  {item['purpose']}  added {item['added_at']}{flag}")
    return EXIT_OK


def cmd_held_list(args: argparse.Namespace) -> int:
    from cfl_sftp.held import list_held

    deployment = _open_deployment(args)
    try:
        held = list_held(deployment)
    finally:
        deployment.close()
    if not held:
        print("no held packages")
    for h in held:
        print(
            f"{h.upload_id}  {h.reason}  {h.organisation}/{h.uploader}  {h.file_name}  {h.size} bytes  "
            f"held {h.held_at:%Y-%m-%dT%H:%M:%SZ}  library image {h.image_path}"
        )
    return EXIT_OK


def cmd_held_release(args: argparse.Namespace) -> int:
    from cfl_sftp.held import release
    from cfl_sftp.storage.library_repo import image_ref

    deployment = _open_deployment(args)
    try:
        image = release(deployment, args.id, args.reason)
        print(f"released {args.id}: {image_ref(image).path} is now the current image")
    finally:
        deployment.close()
    return EXIT_OK


def cmd_held_purge(args: argparse.Namespace) -> int:
    from cfl_sftp.held import purge

    deployment = _open_deployment(args)
    try:
        purge(deployment, args.id)
    finally:
        deployment.close()
    print(f"purged {args.id}")
    return EXIT_OK


def cmd_vault_rotate(args: argparse.Namespace) -> int:
    from cfl_sftp.vault_admin import FinishReport, finish_rotation, rotate_key

    deployment = _open_deployment(args)
    try:
        report = finish_rotation(deployment) if args.finish else rotate_key(deployment)
    finally:
        deployment.close()
    if not isinstance(report, FinishReport):
        old = ", ".join(report.old_key_ids)
        print(f"added {report.new_key_id} as the wrapping key (old: {old})" if report.key_added
              else f"continuing the rotation to {report.new_key_id} (old: {old})")
    print(f"re-wrapped {report.rewrap.rewrapped} data key(s) under {report.rewrap.wrapping_key_id}")
    if report.rewrap.unreadable:
        raise Refused(f"{len(report.rewrap.unreadable)} data key(s) did not unwrap and stay under an old key "
                      "(tampered, moved, or under a key the ring lacks; object ids in the log)")
    if not isinstance(report, FinishReport):
        print("next, once every node runs with this ring: cfl-sftp vault rotate-key --finish")
    elif report.ring_rewritten:
        print(f"dropped {', '.join(report.dropped_key_ids)}: the key ring holds {report.kept_key_id} only")
    elif report.dropped_key_ids:
        print(f"every data key is under {report.kept_key_id}: remove the lines of "
              f"{', '.join(report.dropped_key_ids)} from the credential on every node (docs/vault.md)")
    else:
        print(f"nothing to drop: the key ring holds {report.kept_key_id} only")
    return EXIT_OK


class _ProgressBar:
    """``verifying 12,345 / 1,000,000 entries (1%)`` redrawn in place on stderr, at most ten times a second."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._drawn = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._drawn < 0.1 and done < total:
            return
        self._drawn = now
        percent = 100 * done // total if total else 100
        sys.stderr.write(f"\r{self._label} {done:,} / {total:,} entries ({percent}%)")
        sys.stderr.flush()

    def clear(self) -> None:
        if self._drawn:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from cfl_sftp.audit_trail import AuditTrailError, verify_trail
    from cfl_sftp.deployment import KeyFileError

    deployment = _open_deployment(args)
    bar = _ProgressBar("verifying") if sys.stderr.isatty() else None
    try:
        report = verify_trail(deployment, progress=bar)
    except KeyFileError as exc:
        raise Refused(str(exc)) from exc
    except AuditTrailError as exc:
        raise Refused(f"audit trail does not verify: {exc}") from exc
    finally:
        if bar is not None:
            bar.clear()
        deployment.close()
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"audit trail verified: {report.entries} entries, {report.checkpoints} checkpoint(s), root "
          f"{report.root.hex()}")
    if report.covered:
        print(f"seq 1 to {report.covered} are covered by the newest checkpoint ({report.covered})")
    if report.uncovered:
        first = report.covered + 1
        span = f"seq {first}" if report.uncovered == 1 else f"seq {first} to {report.entries}"
        print(f"{span} ({report.uncovered} entr{'y' if report.uncovered == 1 else 'ies'}) not yet covered by a "
              "checkpoint")
    return EXIT_OK


def cmd_audit_prove(args: argparse.Namespace) -> int:
    from cfl_sftp.audit_trail import AuditTrailError, prove_entry
    from cfl_sftp.deployment import KeyFileError

    deployment = _open_deployment(args)
    try:
        proof = prove_entry(deployment, args.seq)
    except (AuditTrailError, KeyFileError) as exc:
        raise Refused(str(exc)) from exc
    finally:
        deployment.close()
    print(json.dumps(proof.as_json(), indent=2))
    return EXIT_OK


def cmd_audit_export(args: argparse.Namespace) -> int:
    from cfl_sftp.audit_trail import export_entries, parse_since

    try:
        since = parse_since(args.since) if args.since is not None else None
    except ValueError as exc:
        raise Refused(f"--since: {exc}") from exc
    deployment = _open_deployment(args)
    out = sys.stdout.buffer
    try:
        for entry in export_entries(deployment, since):
            out.write(entry + b"\n")
        out.flush()
    except BrokenPipeError:  # `cfl-sftp audit export | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        deployment.close()
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from cfl_sftp.service import serve

    return serve(load_config(_config_path(args)))


def cmd_demo(args: argparse.Namespace) -> int:
    from cfl_sftp.demo import run_demo

    return run_demo(Path(args.dir), args.port, serve=not args.no_serve)


# -- parser ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cfl-sftp", description="The Centralised Firmware Library for GB smart metering, over SFTP."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], help_text: str,
        parent: argparse._SubParsersAction | None = None,  # type: ignore[type-arg]
        *, config: bool = True,
    ) -> argparse.ArgumentParser:
        sub = (parent or commands).add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        if config:
            sub.add_argument("--config", metavar="F", help="configuration file (default: $CFL_SFTP_CONFIG, "
                             "then ./cfl-sftp.toml)")
        return sub

    demo = command("demo", cmd_demo, "create (or reuse) a ready demo deployment and serve it", config=False)
    demo.add_argument("--dir", default="cfl-demo", metavar="D", help="demo folder (default ./cfl-demo)")
    demo.add_argument("--port", type=int, default=2222, metavar="P", help="port on 127.0.0.1 (default 2222)")
    demo.add_argument("--no-serve", action="store_true", help="prepare the demo and exit")

    init = command("init", cmd_init, "create a new deployment in an empty or new folder", config=False)
    init.add_argument("dir", metavar="DIR")

    command("serve", cmd_serve, "run the service in the foreground")

    package = commands.add_parser("package", help="build and check .cfl packages").add_subparsers(
        dest="package_command", required=True, metavar="COMMAND"
    )
    build = command("build", cmd_package_build, "make and sign a .cfl package", package, config=False)
    build.add_argument("--manifest", required=True, metavar="M", help="JSON with the manifest's fields")
    build.add_argument("--image", required=True, metavar="I")
    build.add_argument("--release-notes", metavar="R")
    build.add_argument("--key", required=True, metavar="K", help="PEM private key (ECDSA P-256 or Ed25519)")
    build.add_argument("-o", "--output", required=True, metavar="OUT")
    verify = command("verify", cmd_package_verify, "run gateway checks 1-5 on a local package", package)
    verify.add_argument("file", metavar="FILE")
    verify.add_argument("--keys", metavar="DIR", help="laid out as policies/manufacturer-keys/")

    policy = commands.add_parser("policy", help="policy sets").add_subparsers(
        dest="policy_command", required=True, metavar="COMMAND"
    )
    check = command("check", cmd_policy_check, "validate a policy directory without applying it", policy)
    check.add_argument("dir", nargs="?", metavar="DIR")

    library = commands.add_parser("library", help="the image library").add_subparsers(
        dest="library_command", required=True, metavar="COMMAND"
    )
    listing = command("list", cmd_library_list, "what the library holds", library)
    listing.add_argument("--json", action="store_true")

    held = commands.add_parser("held", help="held packages").add_subparsers(
        dest="held_command", required=True, metavar="COMMAND"
    )
    command("list", cmd_held_list, "list held packages", held)
    rel = command("release", cmd_held_release, "admit a held version-conflict as the replacement", held)
    rel.add_argument("id", metavar="ID")
    rel.add_argument("--reason", required=True, metavar="TEXT")
    purge = command("purge", cmd_held_purge, "delete a held package for good", held)
    purge.add_argument("id", metavar="ID")

    vault = commands.add_parser("vault", help="the release-note vault").add_subparsers(
        dest="vault_command", required=True, metavar="COMMAND"
    )
    rotate = command("rotate-key", cmd_vault_rotate, "add a new key-encryption key and re-wrap every data key "
                     "under it", vault)
    rotate.add_argument("--finish", action="store_true", help="re-wrap what is left, then drop the old keys")

    audit = commands.add_parser("audit", help="the audit trail").add_subparsers(
        dest="audit_command", required=True, metavar="COMMAND"
    )
    command("verify", cmd_audit_verify, "recompute the audit tree from the entries and check every checkpoint",
            audit)
    prove = command("prove", cmd_audit_prove, "print the inclusion proof of one entry as JSON", audit)
    prove.add_argument("seq", type=int, metavar="SEQ")
    export = command("export", cmd_audit_export, "print the entries' exact bytes, one per line", audit)
    export.add_argument("--since", metavar="T", help="an RFC 3339 time (2025-03-01T00:00:00Z) or a seq number")

    db = commands.add_parser("db", help="the database").add_subparsers(
        dest="db_command", required=True, metavar="COMMAND"
    )
    command("upgrade", cmd_db_upgrade, "apply the database migrations", db)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (Refused, ConfigError) as exc:
        print(f"cfl-sftp: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except CflError as exc:
        print(f"cfl-sftp: {exc.public_message}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

