// The committed generated code (src/gen) is exactly what the pinned
// protoc-gen-es makes from proto/ now: a proto change without
// `npm run generate` fails here.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");

function files(dir, base = dir) {
  return fs
    .readdirSync(dir, { withFileTypes: true })
    .flatMap((e) => (e.isDirectory() ? files(path.join(dir, e.name), base) : [path.relative(base, path.join(dir, e.name))]))
    .sort();
}

test("src/gen matches proto/", () => {
  const out = fs.mkdtempSync(path.join(os.tmpdir(), "spine-gen-"));
  try {
    execFileSync(path.join(root, "node_modules/.bin/buf"), ["generate", "../../proto", "--output", out], { cwd: root, stdio: "pipe" });
    const fresh = path.join(out, "src/gen");
    const committed = path.join(root, "src/gen");
    assert.deepEqual(files(fresh), files(committed), "the same files");
    for (const f of files(fresh)) {
      assert.equal(
        fs.readFileSync(path.join(committed, f), "utf8"),
        fs.readFileSync(path.join(fresh, f), "utf8"),
        `${f} is stale: run \`npm run generate\` in clients/web`,
      );
    }
  } finally {
    fs.rmSync(out, { recursive: true, force: true });
  }
});
