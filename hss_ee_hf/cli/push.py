"""`hss-ee push`: the command-line face of [`hss_ee_hf.hub.upload.push_to_hub`]."""

from __future__ import annotations

import argparse

from .base import Command


class PushCommand(Command):
    """`hss-ee push CHECKPOINT REPO_ID`: upload an EE checkpoint folder (never the key) with a model card."""

    name = "push"
    help = "Upload an EE checkpoint folder to the Hub with a generated model card (never the secret key)."

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("checkpoint", help="the EE checkpoint folder written by `hss-ee convert`")
        p.add_argument("repo_id", help="the Hub repo to push to, e.g. me/smollm2-ee (created if missing)")
        p.add_argument("--private", action="store_true", help="create the repo private")
        p.add_argument("--revision", help="branch to push to (created from main if missing)")
        p.add_argument(
            "--token",
            help="Hub token with write access (default: HF_TOKEN or `hf auth login`; a flag is visible to `ps`)",
        )
        p.add_argument("--commit-message", help="commit message (default: 'Upload EE checkpoint <fingerprint>')")
        p.add_argument("--base-model", help="Hub id of the original model, for the card (default: from config.json)")
        p.add_argument("--license", help="license for the card, e.g. apache-2.0 (default: the base model's)")
        p.add_argument("--template", help="a model card template instead of the bundled one")
        p.add_argument(
            "--dry-run", action="store_true", help="check the folder and print the files and the card; upload nothing"
        )

    def run(self, args: argparse.Namespace) -> int:
        from ..hub.upload import plan_push, push_to_hub

        options = dict(base_model=args.base_model, license=args.license, revision=args.revision)
        if args.dry_run:
            plan = plan_push(args.checkpoint, args.repo_id, template=args.template, **options)
            print(f"would push to {args.repo_id}:")
            for rel in plan.paths_in_repo:
                print(f"  {rel}")
            print()
            print(plan.model_card)
            return 0
        result = push_to_hub(
            args.checkpoint,
            args.repo_id,
            private=args.private,
            token=args.token,
            commit_message=args.commit_message,
            template=args.template,
            **options,
        )
        print(f"pushed: {getattr(result, 'commit_url', None) or args.repo_id}")
        print("the secret key was not uploaded; keep it off the servers")
        return 0
