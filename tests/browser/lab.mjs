// Drives a real JupyterLab in Debian's chromium, as a user would, on a notebook using the capsule kernel.
//
// Usage: node lab.mjs CONFIG_JSON   (tests/test_browser.py runs it and checks what it prints)
// CONFIG: {url, token, notebook, stock_notebook, tour, chromium, shots, guide_shots, timeout_ms, restarts}
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

// A picture of some cells only, for the user guide (docs/images/ holds the ones it shows).
async function guideShot(name, first, last = first) {
  fs.mkdirSync(cfg.guide_shots, { recursive: true });
  const box = await page.evaluate(
    ([a, b]) => {
      const cells = window.jupyterapp.shell.currentWidget.content.widgets;
      cells[a].node.scrollIntoView({ block: "start" });
      const top = cells[a].node.getBoundingClientRect();
      const bottom = cells[b].node.getBoundingClientRect();
      return { x: top.left, y: top.top, width: Math.max(top.width, bottom.width), height: bottom.bottom - top.top };
    },
    [first, last],
  );
  const clip = { x: Math.max(0, box.x), y: Math.max(0, box.y), width: box.width, height: Math.min(box.height, 1000) };
  await page.screenshot({ path: path.join(cfg.guide_shots, `${name}.png`), clip });
}

// The cell at index of the notebook in front (other notebooks' cells are in the page too).
async function cell(index) {
  const id = await page.evaluate(() => window.jupyterapp.shell.currentWidget.id);
  return page.locator(`[id="${id}"] .jp-Cell`).nth(index);
}

// A toolbar button of the notebook in front.
async function toolbarButton(command) {
  const id = await page.evaluate(() => window.jupyterapp.shell.currentWidget.id);
  return page.locator(`[id="${id}"] .jp-NotebookPanel-toolbar [data-command="${command}"]`).first();
}

// Starts code in a new cell without waiting for it to finish (a cell the test will stop).
async function start(code) {
  const index = await submit(code, false);
  await page.waitForFunction(
    () => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === "busy",
  );
  return index;
}

// Types source into the cell at index and presses Tab at its end; the kernel's one completion is taken
// (Enter in the completer's list). Returns the cell's source afterwards and what the list offered.
async function tabComplete(index, source, expected) {
  await page.evaluate(
    ([i, text]) => {
      const notebook = window.jupyterapp.shell.currentWidget.content;
      notebook.activeCellIndex = i;
      notebook.widgets[i].model.sharedModel.setSource(text);
      notebook.mode = "edit";
      const editor = notebook.widgets[i].editor;
      editor.setCursorPosition(editor.getPositionAt(text.length));
      editor.focus();
    },
    [index, source],
  );
  await page.keyboard.press("Tab");
  const offered = await page.waitForFunction(
    ([i, text, want]) => {
      const cell = window.jupyterapp.shell.currentWidget.content.widgets[i];
      if (cell.model.sharedModel.getSource() !== text) return { inserted: true, items: [] };
      const items = [...document.querySelectorAll(".jp-Completer:not(.lm-mod-hidden) .jp-Completer-item")];
      const labels = items.map((e) => e.querySelector(".jp-Completer-match")?.innerText.trim() ?? e.innerText);
      return labels.includes(want) ? { inserted: false, items: labels } : false;
    },
    [index, source, expected],
  );
  const { inserted, items } = await offered.jsonValue();
  if (!inserted) {
    await page.keyboard.press("Enter");
    await page.waitForFunction(
      ([i, text]) => window.jupyterapp.shell.currentWidget.content.widgets[i].model.sharedModel.getSource() !== text,
      [index, source],
    );
  }
  const completed = await page.evaluate(
    (i) => window.jupyterapp.shell.currentWidget.content.widgets[i].model.sharedModel.getSource(),
    index,
  );
  await page.evaluate(() => {
    window.jupyterapp.shell.currentWidget.content.mode = "command";
  });
  return { source: completed, items };
}

// Drags a slider's handle with the mouse, from its centre, `dx` pixels to the right.
async function drag(cellIndex, dx) {
  const handle = (await cell(cellIndex)).locator(".noUi-handle").first();
  await handle.scrollIntoViewIfNeeded();
  const box = await handle.boundingBox();
  const [x, y] = [box.x + box.width / 2, box.y + box.height / 2];
  await page.mouse.move(x, y);
  await page.mouse.down();
  for (let step = 1; step <= 10; step += 1) await page.mouse.move(x + (dx * step) / 10, y);
  await page.mouse.up();
}

async function readout(cellIndex) {
  return page.evaluate(
    (i) => window.jupyterapp.shell.currentWidget.content.widgets[i].node.querySelector(".widget-readout")?.innerText.trim(),
    cellIndex,
  );
}

async function kernelIdle() {
  await page.waitForFunction(() => {
    const context = window.jupyterapp?.shell?.currentWidget?.sessionContext;
    return context?.session?.kernel?.status === "idle" && !context.pendingInput;
  });
}

// Puts code in the notebook's last cell (through the notebook model, as pasting would), runs it and
// adds a new cell below; with finish, waits for the execution to end. Returns the cell's index.
async function submit(code, finish) {
  return page.evaluate(
    async ([source, wait]) => {
      const notebook = window.jupyterapp.shell.currentWidget.content;
      const index = notebook.widgets.length - 1;
      notebook.activeCellIndex = index;
      notebook.mode = "command";
      notebook.activeCell.model.sharedModel.setSource(source);
      const running = window.jupyterapp.commands.execute("notebook:run-cell-and-insert-below");
      if (wait) await running;
      return index;
    },
    [code, finish],
  );
}

// Runs code in a new cell and waits for the execution to finish; returns the cell's index.
async function run(code) {
  const index = await submit(code, true);
  await kernelIdle();
  return index;
}

// Waits until the cell at index has finished (JupyterLab numbers it then) and the kernel is idle. The
// kernel's status alone does not say it: a subshell console's idle makes the connection idle too.
async function cellDone(index) {
  await page.waitForFunction(
    (i) => window.jupyterapp.shell.currentWidget.content.widgets[i].model.executionCount !== null,
    index,
  );
  await kernelIdle();
}

// Runs the cell at index again and waits for it to finish.
async function rerun(index) {
  await page.evaluate(async (i) => {
    const notebook = window.jupyterapp.shell.currentWidget.content;
    notebook.activeCellIndex = i;
    notebook.mode = "command";
    await window.jupyterapp.commands.execute("notebook:run-cell");
  }, index);
  await kernelIdle();
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
  await page.evaluate(async (path) => {
    await window.jupyterapp.commands.execute("docmanager:open", { path });
  }, file);
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
  // The tour, as a new user meets it: Run All, every cell run, every output rendered.
  await page.goto(`${cfg.url}/lab/tree/${cfg.tour}?token=${cfg.token}`);
  await page.waitForFunction(() => window.jupyterapp?.shell?.currentWidget?.sessionContext?.session?.kernel);
  await kernelIdle();
  await page.evaluate(() => window.jupyterapp.commands.execute("notebook:run-all-cells"));
  const tourDeadline = Date.now() + 2 * cfg.timeout_ms;
  for (;;) {
    const state = await page.evaluate(() => {
      const notebook = window.jupyterapp.shell.currentWidget.content;
      const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
      const waiting = notebook.widgets
        .map((cell, i) => (cell.model.type === "code" && cell.model.executionCount === null ? i : -1))
        .filter((i) => i >= 0);
      const cells = waiting.map((i) => JSON.stringify(notebook.widgets[i].model.toJSON()).slice(0, 1500));
      return { status: kernel.status, waiting, cells };
    });
    if (state.status === "idle" && state.waiting.length === 0) break;
    if (Date.now() > tourDeadline) throw new Error(`the tour did not finish: ${JSON.stringify(state)}`);
    await page.waitForTimeout(250); // polling, bounded by the deadline above
  }
  seen.tour = await page.evaluate(() => {
    const notebook = window.jupyterapp.shell.currentWidget.content;
    return notebook.widgets
      .filter((cell) => cell.model.type === "code")
      .map((cell) => ({
        source: cell.model.sharedModel.getSource().split("\n")[0].slice(0, 60),
        count: cell.model.executionCount,
        tags: cell.model.getMetadata("tags") || [],
        types: cell.model.outputs.toJSON().map((output) => output.output_type),
        outputs: [...cell.outputArea.node.querySelectorAll(".jp-OutputArea-output")].map((e) => ({
          mime: e.getAttribute("data-mime-type") || "",
          text: e.textContent.slice(0, 300),
          // Something a reader sees: text, an image, or a widget's view.
          rendered: Boolean(e.textContent.trim() || e.querySelector("img, svg, canvas, .jupyter-widgets")),
        })),
      }));
  });
  await guideShot("tour-limits", 14, 18);
  await screenshot("tour-run-all");
  await page.evaluate(async () => {
    const panel = window.jupyterapp.shell.currentWidget;
    await panel.context.save();
    await panel.sessionContext.shutdown();
    panel.dispose();
  });

  await openNotebook(cfg.notebook);
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
    await guideShot(`traceback-${key}`, failing);
    await openNotebook(cfg.stock_notebook);
  }
  await setTheme("JupyterLab Light");
  await openNotebook(cfg.notebook);

  // A slider: the kernel moves it, the page moves it back.
  const slider = await run("import ipywidgets as w\ns = w.IntSlider(value=3, description='size')\ns");
  const sliderCell = await cell(slider);
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
  // Dragged with the mouse: an observer in the sandbox sees every value the page sends.
  await run("moves = []\ns.observe(lambda change: moves.append(change['new']), 'value')");
  await drag(slider, 120);
  await page.waitForFunction((i) => {
    const text = window.jupyterapp.shell.currentWidget.content.widgets[i].node.querySelector(".widget-readout");
    return text && Number(text.innerText.trim()) > 8;
  }, slider);
  seen.readout_after_drag = await readout(slider);
  // The last of the page's updates may still be on its way: ask until the sandbox has it (bounded).
  const observed = await run("print('observed', moves[-1] if moves else None, 'value', s.value, 'moves', len(moves))");
  for (let ask = 0; ask < 50 && !(await cellText(observed)).includes(`value ${seen.readout_after_drag} `); ask += 1) {
    await rerun(observed);
  }
  seen.observer_after_drag = await cellText(observed);
  await screenshot("slider");
  await guideShot("slider", slider, observed);

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

  // The stop button on a loop that never ends: KeyboardInterrupt, the namespace kept.
  const looping = await start("spins = 0\nwhile True:\n    spins += 1");
  await (await toolbarButton("notebook:interrupt-kernel")).click();
  await cellDone(looping);
  seen.interrupted = await cellText(looping);
  const after = await run("print('spun', spins > 0, 'x is', x)");
  seen.after_interrupt = await cellText(after);
  await screenshot("interrupt");
  await guideShot("interrupt", looping, after);

  // A subshell console (JupyterLab's "New Subshell Console for Notebook") reads a variable of a loop that
  // is still running in the notebook; the stop button then ends the loop. The console is opened first:
  // its connection asks kernel_info on the main shell, which a running cell holds (as with ipykernel).
  const notebookPanel = await page.evaluate(() => window.jupyterapp.shell.currentWidget.id);
  await page.evaluate(async () => {
    await window.jupyterapp.commands.execute("notebook:create-subshell-console", { activate: true });
  });
  await page.waitForFunction((id) => {
    const panel = window.jupyterapp.shell.currentWidget;
    return panel && panel.id !== id && panel.console?.sessionContext?.session?.kernel?.subshellId;
  }, notebookPanel);
  const consolePanel = await page.evaluate(() => window.jupyterapp.shell.currentWidget.id);
  await page.evaluate((id) => window.jupyterapp.shell.activateById(id), notebookPanel);
  const counting = await start("progress = 0\nwhile True:\n    progress += 1");
  await page.evaluate((id) => window.jupyterapp.shell.activateById(id), consolePanel);
  await page.evaluate(async () => {
    const panel = window.jupyterapp.shell.currentWidget;
    panel.console.promptCell.model.sharedModel.setSource("print('the loop is at', progress > 0)\n%subshell");
    await window.jupyterapp.commands.execute("console:run-forced");
  });
  await page.waitForFunction(() => {
    const cells = window.jupyterapp.shell.currentWidget.console.cells;
    const last = cells.length ? cells.get(cells.length - 1) : null;
    return last && last.outputArea.node.innerText.includes("subshell list");
  });
  seen.subshell_output = await page.evaluate(() => {
    const cells = window.jupyterapp.shell.currentWidget.console.cells;
    return cells.get(cells.length - 1).outputArea.node.innerText;
  });
  seen.subshell_id = await page.evaluate(
    () => window.jupyterapp.shell.currentWidget.console.sessionContext.session.kernel.subshellId,
  );
  await screenshot("subshell-console");
  await page.screenshot({ path: path.join(cfg.guide_shots, "subshell-console.png") });
  await page.evaluate((id) => window.jupyterapp.shell.activateById(id), notebookPanel);
  await (await toolbarButton("notebook:interrupt-kernel")).click();
  await cellDone(counting);
  seen.loop_interrupted = await cellText(counting);
  // Closing the console deletes its subshell; the notebook's kernel goes on.
  await page.evaluate((id) => [...window.jupyterapp.shell.widgets("main")].find((w) => w.id === id).dispose(), consolePanel);

  // Tab completion after a Wasm cell, and at once after switching back to the subprocess sandbox.
  await run("import collections");
  await run("%capsule mode auto");
  const wasmCell = await run("import sys\nwasm_says = sys.platform\nprint(wasm_says)");
  seen.wasm_cell = await cellText(wasmCell);
  const typing = await run("pass");
  seen.completion_auto = await tabComplete(typing, "collections.Ord", "OrderedDict");
  await run("%capsule mode subprocess");
  const typing2 = await run("pass");
  seen.completion_subprocess = await tabComplete(typing2, "collections.defaultd", "defaultdict");
  await page.evaluate((i) => window.jupyterapp.shell.currentWidget.content.widgets[i].model.sharedModel.setSource(""), typing2);
  // After a switch to Wasm, Tab on a name imported before it: the subprocess sandbox that holds it answers.
  await run("%capsule mode wasm");
  await run("w_after_switch = 1");
  const typing3 = await run("pass");
  seen.completion_after_switch = await tabComplete(typing3, "collections.Ord", "OrderedDict");
  await page.evaluate((i) => window.jupyterapp.shell.currentWidget.content.widgets[i].model.sharedModel.setSource(""), typing3);
  await run("%capsule mode subprocess");

  // The Restart button, several times: an empty namespace each time, never a SandboxDied, never a hang.
  seen.restarts = [];
  seen.restart_ms = [];
  await page.evaluate(() => {
    window.__capsuleRestarts = 0;
    window.jupyterapp.shell.currentWidget.sessionContext.statusChanged.connect((_, status) => {
      if (status === "restarting") window.__capsuleRestarts += 1;
    });
  });
  for (let i = 1; i <= cfg.restarts; i += 1) {
    await run(`before_restart_${i} = ${i}`);
    await (await toolbarButton("notebook:restart-kernel")).click();
    await page.locator(".jp-Dialog .jp-mod-accept").click();
    const pressed = Date.now();
    await page.waitForFunction((n) => window.__capsuleRestarts >= n, i);
    await kernelIdle();
    const after = await run(`print('kept:', 'x' in dir() or 'before_restart_${i}' in dir())`);
    seen.restart_ms.push(Date.now() - pressed); // from the dialog's Restart to the first cell's output
    seen.restarts.push(await cellText(after));
    await screenshot(`after-restart-${i}`);
  }
  seen.page_text = await page.evaluate(() => window.jupyterapp.shell.currentWidget.content.node.innerText);

  // A crash, then the slider that was on the page before it: moved by the keyboard, its observer runs.
  const second = await run("import ipywidgets as w\ncrashed_slider = w.IntSlider(value=2, description='after')\ngot = []\ncrashed_slider.observe(lambda change: got.append(change['new']), 'value')\ncrashed_slider");
  await (await cell(second)).locator(".noUi-handle").waitFor();
  await run("%capsule log -n 1");  // its checkpoint is recorded before the crash
  const crash = await run("import ctypes\nctypes.string_at(0)");
  seen.crash = await cellText(crash);
  await (await cell(second)).locator(".noUi-handle").first().focus();
  await page.keyboard.press("ArrowRight");
  const afterCrash = await run("print('after the crash', got, crashed_slider.value)");
  seen.after_crash = await cellText(afterCrash);
  await screenshot("crash-and-restored-widget");
  await guideShot("crash-and-restored-widget", second, afterCrash);

} catch (err) {
  seen.error = String(err && err.stack ? err.stack : err).slice(0, 2000);
  await screenshot("failure").catch(() => {});
} finally {
  seen.console_errors = consoleErrors;
  await browser.close();
}
console.log(JSON.stringify(seen));
process.exit(seen.error ? 1 : 0);
