// Drive the HTTP API through the official Node SDK (npm `agentkernel` 0.18.1).
// Usage: node drive_node_sdk.mjs SCENARIO PREFIX, with NODE_PATH-free resolution through
// AK_NODE_SDK (the installed package's directory) and AGENTKERNEL_BASE_URL/_API_KEY set.
import assert from "node:assert/strict";
import { pathToFileURL } from "node:url";

const sdk = await import(pathToFileURL(process.env.AK_NODE_SDK + "/dist/index.js").href);
const { AgentKernel, AgentKernelError, AuthError, NotFoundError, ValidationError, ServerError,
        NetworkError } = sdk;
const [scenario, prefix] = process.argv.slice(2);
const c = new AgentKernel();

async function raises(cls, fn) {
  try {
    await fn();
  } catch (err) {
    assert.ok(err instanceof cls, `expected ${cls.name}, got ${err?.constructor?.name}: ${err}`);
    assert.ok(err instanceof AgentKernelError);
    return err;
  }
  assert.fail(`expected ${cls.name}, nothing was thrown`);
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const scenarios = {
  async health() {
    assert.equal(await c.health(), "ok");
    const bad = new AgentKernel({ apiKey: "wrong-key" });
    assert.equal(await bad.health(), "ok");
    const err = await raises(AuthError, () => bad.listSandboxes());
    assert.match(err.message, /Invalid API key/);
    const none = new AgentKernel({ apiKey: "" });
    const err2 = await raises(AuthError, () => none.listSandboxes());
    assert.match(err2.message, /Missing Authorization/);
  },
  async run() {
    assert.equal((await c.run(["echo", "hello-run"])).output, "hello-run\n");
    const out = await c.run(["sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert.equal(out.output, "out\n");
    assert.equal(out.exit_code, 3);
    assert.equal(out.stderr, "err\n");
    assert.equal(out.success, false);
    await raises(ValidationError, () => c.run([]));
    const res = await c.batchRun([{ command: ["echo", "batch-a"] }, { command: ["echo", "batch-b"] }]);
    assert.deepEqual(res.results.map((r) => r.output), ["batch-a\n", "batch-b\n"]);
  },
  async stream() {
    const seen = [];
    const t0 = Date.now();
    for await (const ev of c.runStream(["sh", "-c", "echo first; sleep 2; echo second"])) {
      seen.push([Date.now() - t0, ev.type, ev.data]);
    }
    assert.deepEqual(seen.map((s) => s[1]), ["started", "output", "output", "done"]);
    assert.deepEqual(seen[1][2], { data: "first\n", stream: "stdout" });
    assert.ok(seen[3][0] - seen[1][0] > 1500, `not streamed live: ${JSON.stringify(seen)}`);
    assert.equal(seen[3][2].exit_code, 0);
  },
  async sandboxes() {
    const name = `${prefix}-sb`;
    const info = await c.createSandbox(name, { image: undefined });
    assert.equal(info.name, name);
    assert.equal(info.status, "running");
    try {
      await raises(ServerError, () => c.createSandbox(name));
      assert.equal((await c.getSandbox(name)).name, name);
      assert.ok((await c.listSandboxes()).some((s) => s.name === name));
      assert.equal((await c.getSandboxByUuid(info.uuid)).name, name);
      const out = await c.execInSandbox(name, ["sh", "-c", "echo $V; pwd"],
        { env: ["V=node-value"], workdir: "/tmp" });
      assert.equal(out.output, "node-value\n/tmp\n");
      assert.equal((await c.execInSandbox(name, ["id", "-u"], { sudo: true, env: [] })).output, "0\n");
      const fail = await c.execInSandbox(name, ["sh", "-c", "exit 9"]);
      assert.equal(fail.exit_code, 9);
      assert.ok(Array.isArray(await c.getSandboxLogs(name)));
      const ttl = await c.extendTtl(name, { by: "1h" });
      assert.equal(typeof ttl.expires_at, "string");
      await raises(ValidationError, () => c.extendTtl(name, { by: "later" }));
    } finally {
      await c.removeSandbox(name);
    }
    await raises(NotFoundError, () => c.getSandbox(name));
    await raises(NotFoundError, () => c.execInSandbox(name, ["true"]));
    await raises(NotFoundError, () => c.removeSandbox(name));
    await raises(ValidationError, () => c.createSandbox("../../x"));
    await raises(ValidationError, () => c.getSandbox("a b/c%d"));
  },
  async files() {
    const name = `${prefix}-files`;
    const sb = await c.sandbox(name);
    try {
      assert.equal(typeof (await c.writeFile(name, "/tmp/p/a.txt", "hello\n")), "string");
      const got = await c.readFile(name, "/tmp/p/a.txt");
      assert.deepEqual(got, { content: "hello\n", encoding: "utf8", size: 6 });
      await c.writeFile(name, "/tmp/p/bin.dat", "AAEC//4=", { encoding: "base64" });
      const bin = await c.readFile(name, "/tmp/p/bin.dat");
      assert.deepEqual(bin, { content: "AAEC//4=", encoding: "base64", size: 5 });
      assert.equal((await sb.writeFiles({ "/tmp/p/b.txt": "B", "/tmp/p/c.txt": "C" })).written, 2);
      assert.equal((await sb.run(["cat", "/tmp/p/b.txt", "/tmp/p/c.txt"])).output, "BC");
      await c.deleteFile(name, "/tmp/p/b.txt");
      await raises(NotFoundError, () => c.readFile(name, "/tmp/p/b.txt"));
      assert.equal((await sb.info()).name, name);
    } finally {
      await sb[Symbol.asyncDispose]();
      await sb.remove(); // idempotent: no second DELETE
    }
    await raises(NotFoundError, () => c.getSandbox(name));
  },
  async detached() {
    const name = `${prefix}-det`;
    const sb = await c.sandbox(name);
    try {
      const cmd = await c.execDetached(name, ["sh", "-c", "echo out; echo err >&2; sleep 30"]);
      assert.equal(cmd.status, "running");
      assert.ok((await c.detachedList(name)).some((d) => d.id === cmd.id));
      assert.equal((await c.detachedStatus(name, cmd.id)).status, "running");
      for (let i = 0; !((await c.detachedLogs(name, cmd.id)).stdout ?? "").includes("out"); i++) {
        assert.ok(i < 200, "no detached output");
        await sleep(50);
      }
      assert.match((await c.detachedLogs(name, cmd.id, "stderr")).stderr, /err/);
      assert.equal(typeof (await c.detachedKill(name, cmd.id)), "string");
      for (let i = 0; (await c.detachedStatus(name, cmd.id)).status === "running"; i++) {
        assert.ok(i < 200, "kill did not end the command");
        await sleep(50);
      }
      await raises(NotFoundError, () => c.detachedStatus(name, "nosuchid"));
    } finally {
      await sb.remove();
    }
  },
  async snapshots() {
    const name = `${prefix}-snap`;
    const snap = `${name}-s1`;
    const sb = await c.sandbox(name);
    await c.writeFile(name, "/tmp/kept.txt", "kept");
    const meta = await c.takeSnapshot({ sandbox: name, name: snap });
    assert.equal(meta.name, snap);
    assert.ok((await c.listSnapshots()).some((s) => s.name === snap));
    assert.equal((await c.getSnapshot(snap)).sandbox, name);
    await sb.remove();
    const restored = await c.restoreSnapshot(snap);
    try {
      assert.equal((await c.readFile(restored.name, "/tmp/kept.txt")).content, "kept");
    } finally {
      await c.removeSandbox(restored.name);
    }
    await c.deleteSnapshot(snap);
    await raises(NotFoundError, () => c.getSnapshot(snap));
  },
  async durable() {
    await raises(NotFoundError, () => c.listOrchestrations());
    await raises(NotFoundError, () => c.listObjects());
    await raises(NotFoundError, () => c.listSchedules());
    await raises(NotFoundError, () => c.listStores());
    await raises(NotFoundError, () => c.getOrchestrationDefinition("x"));
  },
  async network() {
    const dead = new AgentKernel({ baseUrl: "http://127.0.0.1:9" });
    await raises(NetworkError, () => dead.health());
  },
};

await scenarios[scenario]();
console.log(`ok ${scenario}`);
