"""writer, scripted: what a model following AGENT.md would do, with no model in the loop."""

import json
import os
import subprocess
import sys


def covey(*args: str) -> str:
    done = subprocess.run(["covey", *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"covey {args[0]} failed with exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def main() -> None:
    me = f"agent:{os.environ['COVEY_AGENT']}"
    with open(os.environ["COVEY_DIGEST_FILE"]) as digest:
        news = [line.strip() for line in digest if line.startswith("- #")]
    print(f"digest at start: {'; '.join(news) if news else 'nothing new'}")
    inbox = json.loads(covey("inbox", "--json"))
    print(f"inbox: {len(inbox)} message(s)")
    covey("emit", "status", f"working through {len(inbox)} message(s)")
    for done, mail in enumerate(inbox, start=1):
        message = json.loads(covey("read", mail["id"], "--json"))
        covey("emit", "tool", f"covey read {mail['id'][:12]}")
        print(f"read {message['subject']!r} from {message['sender']}")
        if message["recipient"] == "team:research" and message["sender"] != me:
            first_line = message["body"].splitlines()[0]
            summary = f"{message['sender']} found: {first_line} (full text in the thread)"
            covey("send", "human:ada", "Summary: queues for agent mail", "--body", summary)
            print("sent a summary to human:ada")
            covey("reply", mail["id"], "--body", "Thanks, summarised for ada.")
            print(f"thanked {message['sender']} in the same thread")
            covey("send", "all", "Published: summary of queues for agent mail")
            print("told everyone (all)")
        covey("done", mail["id"])
        fraction = f"{done / len(inbox)}"
        covey("emit", "progress", f"{done} of {len(inbox)} done", "--fraction", fraction)
    covey("emit", "result", f"{len(inbox)} message(s) handled")


if __name__ == "__main__":
    main()
