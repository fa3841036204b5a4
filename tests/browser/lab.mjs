// Drives a real JupyterLab in Debian's chromium, as a user would, on a notebook using the capsule kernel.
//
// Usage: node lab.mjs CONFIG_JSON   (tests/test_browser.py runs it and checks what it prints)
// CONFIG: {url, token, notebook, chromium, shots, timeout_ms, restarts}
// Prints one JSON object: what each step saw (texts, colour contrasts, states), plus "error" if a step
// could not be done. Every wait is a wait for a condition, bounded by timeout_ms.

import fs from "node:fs";
import path from "node:path";
import { chromium } from "playwright-core";

const cfg = JSON.parse(process.argv[2]);
const seen = { steps: [] };
fs.mkdirSync(cfg.shots, { recursive: true });

const browser = await chromium.launch({
  executablePath: cfg.chromium,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
page.setDefaultTimeout(cfg.timeout_ms);
const consoleErrors = [];
page.on("console", (msg) => {
  if (msg.type() === "error") consoleErrors.push(msg.text().slice(0, 300));
});

let shot = 0;
async function screenshot(name) {
  shot += 1;
  const file = path.join(cfg.shots, `${String(shot).padStart(2, "0")}-${name}.png`);
  await page.screenshot({ path: file });
  seen.steps.push(name);
}

async function kernelIdle() {
  await page.waitForFunction(() => {
    const context = window.jupyterapp?.shell?.currentWidget?.sessionContext;
    return context?.session?.kernel?.status === "idle" && !context.pendingInput;
  });
}

// Runs code in the notebook's last cell (set through the notebook model, as pasting would; a new cell
// is added below it) and waits for the execution to finish; returns the cell's index.
async function run(code) {
  const index = await page.evaluate(async (source) => {
    const notebook = window.jupyterapp.shell.currentWidget.content;
    const index = notebook.widgets.length - 1;
    notebook.activeCellIndex = index;
    notebook.mode = "command";
    notebook.activeCell.model.sharedModel.setSource(source);
    await window.jupyterapp.commands.execute("notebook:run-cell-and-insert-below");
    return index;
  }, code);
  await kernelIdle();
  return index;
}

async function cellText(index) {
  return page.evaluate((i) => {
    const cell = window.jupyterapp.shell.currentWidget.content.widgets[i];
    return cell.outputArea ? cell.outputArea.node.innerText : "";
  }, index);
}

// The colours of the text in a cell's outputs, and the lowest WCAG contrast ratio between any of it
// and what is behind it.
async function colours(index) {
  return page.evaluate((i) => {
    const node = window.jupyterapp.shell.currentWidget.content.widgets[i].outputArea.node;
    const rgb = (text) => (text.match(/[\d.]+/g) || []).map(Number);
    const luminance = ([r, g, b]) => {
      const channel = (v) => {
        const c = v / 255;
        return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
      };
      return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b);
    };
    const background = (element) => {
      for (let e = element; e; e = e.parentElement) {
        const [r, g, b, a] = rgb(getComputedStyle(e).backgroundColor);
        if (a === undefined || a > 0) return [r, g, b];
      }
      return [255, 255, 255];
    };
    let lowest = { ratio: 99, text: "", color: "", background: "" };
    const used = new Set();
    const walker = document.createTreeWalker(node, NodeFilter.SHOW_TEXT);
    for (let text = walker.nextNode(); text; text = walker.nextNode()) {
      if (!text.textContent.trim()) continue;
      const element = text.parentElement;
      const fg = rgb(getComputedStyle(element).color);
      const bg = background(element);
      const [l1, l2] = [luminance(fg), luminance(bg)].sort((a, b) => b - a);
      const ratio = (l1 + 0.05) / (l2 + 0.05);
      used.add(`${fg} on ${bg}`);
      if (ratio < lowest.ratio) {
        lowest = { ratio, text: text.textContent.trim().slice(0, 40), color: `${fg}`, background: `${bg}` };
      }
    }
    return { lowest, used: [...used].sort() };
  }, index);
}

async function openNotebook(file) {
  await page.evaluate((path) => window.jupyterapp.commands.execute("docmanager:open", { path }), file);
  await page.waitForFunction((path) => window.jupyterapp.shell.currentWidget?.context?.path === path, file);
  await page.waitForFunction(() => window.jupyterapp.shell.currentWidget.sessionContext?.session?.kernel);
  await kernelIdle();
}

// Switches the theme and waits until its colours are in force (the page's background follows it).
async function setTheme(theme) {
  await page.evaluate((name) => window.jupyterapp.commands.execute("apputils:change-theme", { theme: name }), theme);
  await page.waitForFunction((name) => {
    if (document.body.dataset.jpThemeName !== name) return false;
    const light = document.body.dataset.jpThemeLight === "true";
    const value = getComputedStyle(document.body).getPropertyValue("--jp-layout-color0").trim();
    const probe = document.createElement("div");
    probe.style.color = value;
    document.body.appendChild(probe);
    const [r, g, b] = (getComputedStyle(probe).color.match(/[\d.]+/g) || []).map(Number);
    probe.remove();
    return value !== "" && (r + g + b > 3 * 128) === light;
  }, theme);
}

try {
  await page.goto(`${cfg.url}/lab/tree/${cfg.notebook}?token=${cfg.token}`);
  await page.waitForFunction(() => window.jupyterapp?.shell?.currentWidget?.sessionContext?.session?.kernel);
  seen.kernel = await page.evaluate(() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.name);
  await kernelIdle();

  // A cell runs and prints.
  const first = await run("x = 41\nprint('hello from capsule', x + 1)");
  seen.first_output = await cellText(first);
  await screenshot("first-cell");

  // A traceback on the light theme, then on the dark one; the same cell in stock ipykernel beside it.
  const failingCode = "def divide(a, b):\n    return a / b\n\ndivide(1, 0)";
  const failing = await run(failingCode);
  seen.traceback = await cellText(failing);
  await openNotebook(cfg.stock_notebook);
  const stockFailing = await run(failingCode);
  seen.stock_traceback = await cellText(stockFailing);
  for (const theme of ["JupyterLab Light", "JupyterLab Dark"]) {
    const key = theme.split(" ")[1].toLowerCase();
    await setTheme(theme);
    seen[`stock_${key}`] = await colours(stockFailing);
    await screenshot(`stock-traceback-${key}`);
    await openNotebook(cfg.notebook);
    seen[`capsule_${key}`] = await colours(failing);
    await screenshot(`traceback-${key}`);
    await openNotebook(cfg.stock_notebook);
  }
  await setTheme("JupyterLab Light");
  await openNotebook(cfg.notebook);

  // A slider: the kernel moves it, the page moves it back.
  const slider = await run("import ipywidgets as w\ns = w.IntSlider(value=3, description='size')\ns");
  const sliderCell = page.locator(".jp-Notebook .jp-Cell").nth(slider);
  await sliderCell.locator(".widget-slider").waitFor();
  await run("s.value = 7");
  await page.waitForFunction(
    (i) => {
      const cell = window.jupyterapp.shell.currentWidget.content.widgets[i].node;
      return cell.querySelector(".widget-readout")?.innerText.trim() === "7";
    },
    slider,
  );
  seen.readout_after_kernel_move = "7";
  await sliderCell.locator(".noUi-handle").first().focus();
  await page.keyboard.press("ArrowRight");
  const readBack = await run("print('slider at', s.value)");
  seen.slider_after_page_move = await cellText(readBack);
  await screenshot("slider");

  // The Output widget captures what is printed inside it.
  const captured = await run("out = w.Output()\ndisplay(out)\nwith out:\n    print('captured inside')\nprint('printed outside')");
  await page.waitForFunction(
    (i) => {
      const node = window.jupyterapp.shell.currentWidget.content.widgets[i].node;
      return node.querySelector(".widget-output")?.innerText.includes("captured inside");
    },
    captured,
  );
  seen.output_widget = await page.evaluate((i) => {
    const node = window.jupyterapp.shell.currentWidget.content.widgets[i].node;
    const widget = node.querySelector(".widget-output");
    const streams = [...node.querySelectorAll(".jp-OutputArea-output")]
      .filter((e) => !widget.contains(e) && !e.contains(widget))
      .map((e) => e.innerText);
    return { inside: widget.innerText, outside: streams.join("\n") };
  }, captured);
  await screenshot("output-widget");

  // The Restart button, several times: an empty namespace each time, never a SandboxDied, never a hang.
  seen.restarts = [];
  await page.evaluate(() => {
    window.__capsuleRestarts = 0;
    window.jupyterapp.shell.currentWidget.sessionContext.statusChanged.connect((_, status) => {
      if (status === "restarting") window.__capsuleRestarts += 1;
    });
  });
  for (let i = 1; i <= cfg.restarts; i += 1) {
    await run(`before_restart_${i} = ${i}`);
    await page.locator('.jp-NotebookPanel-toolbar [data-command="notebook:restart-kernel"]').first().click();
    await page.locator(".jp-Dialog .jp-mod-accept").click();
    await page.waitForFunction((n) => window.__capsuleRestarts >= n, i);
    await kernelIdle();
    const after = await run(`print('kept:', 'x' in dir() or 'before_restart_${i}' in dir())`);
    seen.restarts.push(await cellText(after));
    await screenshot(`after-restart-${i}`);
  }
  seen.page_text = await page.evaluate(() => window.jupyterapp.shell.currentWidget.content.node.innerText);
} catch (err) {
  seen.error = String(err && err.stack ? err.stack : err).slice(0, 2000);
  await screenshot("failure").catch(() => {});
} finally {
  seen.console_errors = consoleErrors;
  await browser.close();
}
console.log(JSON.stringify(seen));
process.exit(seen.error ? 1 : 0);
