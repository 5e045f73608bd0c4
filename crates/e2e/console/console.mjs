// Drives the web console in headless Chromium (Playwright's playwright-core, Debian's chromium),
// for crates/e2e/tests/console.rs, which boots the system and runs this with:
//   GATEWAY, KEY        the gateway and an admin API key
//   PHOTO               an image file to upload
//   SHOTS               where the screenshots go
//   SEEDED              how many jobs the test made before (the list must show them all)
//   STOPPED_WORKER      the name of a role the test freezes when told (see below)
//   PLAYWRIGHT_MODULES  the node_modules folder playwright-core is installed in
// Each step prints `STEP <name>` when it passed; before checking that a dead role shows as dead
// it prints `WAIT freeze` and reads a line from stdin (the test freezes the role, then answers).
// Exits 0 when every step passed, 1 with the reason otherwise.
import { createRequire } from "node:module";
import { mkdirSync, readFileSync } from "node:fs";
import { join, basename } from "node:path";
import { createInterface } from "node:readline";

const require = createRequire(join(process.env.PLAYWRIGHT_MODULES, "noop.js"));
const { chromium } = require("playwright-core");
const { GATEWAY, KEY, PHOTO, SHOTS, SEEDED, STOPPED_WORKER } = process.env;
mkdirSync(SHOTS, { recursive: true });

const step = (name, detail = "") => console.log(`STEP ${name}${detail ? " " + detail : ""}`);
const stdin = createInterface({ input: process.stdin });
const nextLine = () => new Promise((resolve) => stdin.once("line", resolve));

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
let failed = null;
let page = null;
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, acceptDownloads: true });
  page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  // Every answer of 400 or more is an error of the page.
  page.on("response", (r) => { if (r.status() >= 400) errors.push(`${r.status()} ${r.request().method()} ${r.url()}`); });

  // 1. The first load: what crosses the wire (headers included), from a cold cache.
  const cdp = await context.newCDPSession(page);
  await cdp.send("Network.enable");
  await cdp.send("Network.setCacheDisabled", { cacheDisabled: true });
  let transferred = 0;
  const urls = [];
  cdp.on("Network.loadingFinished", (e) => { transferred += e.encodedDataLength; });
  cdp.on("Network.requestWillBeSent", (e) => urls.push(e.request.url));
  // (What the page's own events miss: the browser's requests, such as a favicon's.)
  cdp.on("Network.responseReceived", (e) => { if (e.response.status >= 400) errors.push(`${e.response.status} ${e.response.url}`); });
  await page.goto(`${GATEWAY}/console`, { waitUntil: "networkidle" });
  const foreign = urls.filter((u) => !u.startsWith(GATEWAY) && !u.startsWith("data:"));
  if (foreign.length) throw new Error(`the page loaded from elsewhere: ${foreign.join(", ")}`);
  if (transferred > 200 * 1024) throw new Error(`the first load transferred ${transferred} bytes (budget 200 KB)`);
  await page.screenshot({ path: join(SHOTS, "01-first-load.png"), fullPage: true });
  step("first-load", `${transferred} bytes in ${urls.length} requests`);
  await cdp.send("Network.setCacheDisabled", { cacheDisabled: false });

  // 2. The key.
  await page.fill("#key", KEY);
  await page.click("#key-form button");
  await page.waitForSelector("#key-state:text('key set')");
  step("key");

  // 3. Drag and drop one photo onto the drop zone (a real drop event with a File in it), with
  //    options, then two more through the file picker.
  await page.fill("#options", "width=320&format=webp");
  const bytes = readFileSync(PHOTO).toString("base64");
  await page.evaluate(({ bytes, name }) => {
    const raw = Uint8Array.from(atob(bytes), (c) => c.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([raw], name, { type: "image/jpeg" }));
    const drop = document.querySelector("#drop");
    drop.dispatchEvent(new DragEvent("dragover", { dataTransfer: transfer, bubbles: true, cancelable: true }));
    drop.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
  }, { bytes, name: basename(PHOTO) });
  const link = page.locator("#uploads tbody tr a").first();
  await link.waitFor({ timeout: 30000 });
  const jobId = await link.textContent();
  await page.setInputFiles("#files", [PHOTO, PHOTO]);
  await page.waitForFunction(() => document.querySelectorAll("#uploads tbody tr a").length >= 3, null, { timeout: 30000 });
  step("upload", jobId);

  // 4. Watch it finish, live, and open the result.
  await link.click();
  await page.waitForSelector("#job-state.succeeded", { timeout: 60000 });
  await page.waitForFunction(() => {
    const img = document.querySelector("#job-results img");
    return img && img.complete && img.naturalWidth > 0;
  }, null, { timeout: 30000 });
  const size = await page.evaluate(() => { const i = document.querySelector("#job-results img"); return [i.naturalWidth, i.naturalHeight]; });
  if (size[0] !== 320) throw new Error(`the preview is ${size[0]}×${size[1]}, not 320 wide`);
  const kinds = await page.$$eval("#job-history tbody tr td:nth-child(2)", (tds) => tds.map((t) => t.textContent));
  if (kinds[0] !== "accepted" || kinds[kinds.length - 1] !== "succeeded") throw new Error(`history: ${kinds.join(", ")}`);
  const [download] = await Promise.all([page.waitForEvent("download"), page.click("#job-results a.download")]);
  const saved = join(SHOTS, download.suggestedFilename());
  await download.saveAs(saved);
  if (readFileSync(saved).subarray(8, 12).toString() !== "WEBP") throw new Error("the download is not the WebP result");
  await page.screenshot({ path: join(SHOTS, "02-job.png"), fullPage: true });
  step("job", `${kinds.join(",")} ${size.join("x")}`);

  // 5. The job list with every seeded job, page after page, then a new job arriving live.
  await page.goto(`${GATEWAY}/console#jobs`);
  await page.waitForFunction(() => document.querySelectorAll("#jobs tbody tr").length >= 100, null, { timeout: 30000 });
  const started = Date.now();
  let slowest = 0;
  while (await page.isVisible("#jobs-more")) {
    const before = await page.$$eval("#jobs tbody tr", (r) => r.length);
    const t = Date.now();
    await page.click("#jobs-more");
    await page.waitForFunction((n) => document.querySelectorAll("#jobs tbody tr").length > n || document.querySelector("#jobs-more").hidden, before, { timeout: 15000 });
    slowest = Math.max(slowest, Date.now() - t);
  }
  const listed = await page.$$eval("#jobs tbody tr", (r) => r.length);
  if (listed < Number(SEEDED)) throw new Error(`the list shows ${listed} jobs, not the ${SEEDED} made`);
  const fresh = await page.evaluate(async ({ bytes }) => {
    const raw = Uint8Array.from(atob(bytes), (c) => c.charCodeAt(0));
    const res = await fetch("/api/upload?width=64&format=png", { method: "POST", headers: { "X-API-KEY": localStorage.getItem("pixmesh.key"), "Content-Type": "image/jpeg" }, body: raw });
    return (await res.json()).id;
  }, { bytes });
  await page.waitForSelector(`#jobs tbody tr[data-id="${fresh}"] .state.succeeded`, { timeout: 60000 });
  // Still responsive with everything listed: a filter change re-renders at once.
  const t = Date.now();
  await page.selectOption("#jobs-state", "succeeded");
  await page.waitForFunction(() => document.querySelectorAll("#jobs tbody tr").length >= 100, null, { timeout: 15000 });
  const filtered = Date.now() - t;
  await page.selectOption("#jobs-state", "");
  await page.screenshot({ path: join(SHOTS, "03-jobs.png") });
  step("jobs", `${listed} listed in ${Date.now() - started} ms, slowest page ${slowest} ms, filter ${filtered} ms`);

  // 6. The cluster page: the workers with their numbers, every role ready; then a role that
  //    stops answering shows as dead while the rest of the page goes on.
  await page.goto(`${GATEWAY}/console#cluster`);
  await page.waitForFunction(() => document.querySelectorAll("#cluster-workers tbody tr").length >= 2, null, { timeout: 30000 });
  const breakers = await page.$$eval("#cluster-workers tbody tr td:nth-child(5)", (tds) => tds.map((t) => t.textContent));
  if (!breakers.every((b) => b === "closed")) throw new Error(`breakers: ${breakers}`);
  await page.waitForFunction(() => [...document.querySelectorAll("#cluster-roles tbody tr td:nth-child(3)")].every((t) => t.textContent === "ready"), null, { timeout: 30000 });
  const depth = await page.textContent("#queue-depth");
  if (!/^\d+$/.test(depth.trim())) throw new Error(`queue depth: ${depth}`);
  await page.screenshot({ path: join(SHOTS, "04-cluster.png"), fullPage: true });
  step("cluster", `${breakers.length} workers, queue depth ${depth}`);
  console.log("WAIT freeze");
  await nextLine();
  await page.waitForSelector(`#cluster-roles tbody tr[data-name="${STOPPED_WORKER}"] td.bad:text("dead")`, { timeout: 20000 });
  await page.waitForSelector("#cluster-sources:not([hidden])");
  const others = await page.$$eval("#cluster-roles tbody tr", (rows) => rows.filter((r) => r.children[2].textContent === "ready").length);
  if (others < 3) throw new Error(`only ${others} roles still shown ready`);
  await page.screenshot({ path: join(SHOTS, "05-cluster-dead-role.png"), fullPage: true });
  step("dead-role", `${STOPPED_WORKER} dead, ${others} ready`);

  if (errors.length) throw new Error(`errors in the page: ${errors.join(" | ")}`);
} catch (e) {
  failed = e;
  if (page) {
    await page.screenshot({ path: join(SHOTS, "failure.png"), fullPage: true }).catch(() => {});
    const text = await page.evaluate(() => document.querySelector("main").innerText).catch(() => "");
    failed = new Error(`${e.message}\n--- the page said:\n${text.slice(0, 2000)}`);
  }
} finally {
  await browser.close();
  stdin.close();
}
if (failed) {
  console.log(`FAILED ${failed.stack || failed}`);
  process.exit(1);
}
console.log("DONE");
