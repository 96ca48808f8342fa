#!/usr/bin/env bash
# Remakes docs/tensorboard.png: TensorBoard's time series page for two small CPU runs
# (flow and iid, 200 steps each) on a synthetic build, filtered to train/loss, train/lr,
# train/grad_norm, val/val_loss and val/val_loss_ema.
#
# Needs the project's venv (tensorboard installed: framebridge[tensorboard]), node, and the npm
# packages puppeteer-core and @sparticuz/chromium (it ships a headless Chromium inside the
# package) installed in the folder $SHOT_NPM_DIR, e.g.
#   mkdir -p /tmp/tbshot/npm && cd /tmp/tbshot/npm && npm init -y && npm install puppeteer-core @sparticuz/chromium
# Run from the repository root:
#   SHOT_NPM_DIR=/tmp/tbshot/npm docs/tensorboard_screenshot.sh
# The build and the runs go to $SHOT_WORK (default /tmp/tbshot); a step whose output is already
# there is skipped. Training takes about 4 minutes a run on one CPU thread.
set -euo pipefail

: "${SHOT_NPM_DIR:?set SHOT_NPM_DIR to the folder where puppeteer-core and @sparticuz/chromium are installed}"
WORK=${SHOT_WORK:-/tmp/tbshot}
OUT=${1:-docs/tensorboard.png}
mkdir -p "$WORK"

[ -d "$WORK/shards" ] ||
    pipeline build --src synthetic --synth-sequences 8 --val-fraction 0.25 --out "$WORK/shards" --no-progress

for method in flow iid; do
    [ -f "$WORK/runs/$method/ckpt-00000200.pt" ] ||
        OMP_NUM_THREADS=1 python -m train --shards "$WORK/shards" --out "$WORK/runs/$method" \
            --method "$method" --recipe cpu-short --max-steps 200 --val-every 25 --diag-every 50 \
            --ckpt-every 50 --tensorboard --no-progress
done

# TensorBoard on a free port of 127.0.0.1 only, stopped by its PID on exit
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
tensorboard --logdir "$WORK/runs" --host 127.0.0.1 --port "$PORT" > "$WORK/tensorboard.log" 2>&1 &
TB_PID=$!
trap 'kill "$TB_PID" 2>/dev/null || true' EXIT
for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$PORT/data/runs" > /dev/null && break
    sleep 1
done

JS=$(mktemp "$WORK/shot-XXXXXX.js")
cat > "$JS" <<'EOF'
const chromium = require('@sparticuz/chromium');
const puppeteer = require('puppeteer-core');
const [url, out, filter] = process.argv.slice(2);
const sleep = ms => new Promise(r => setTimeout(r, ms));
(async () => {
  const browser = await puppeteer.launch({executablePath: await chromium.executablePath(),
    args: chromium.args, headless: true, defaultViewport: {width: 1400, height: 1050}});
  const page = await browser.newPage();
  await page.goto(url, {waitUntil: 'networkidle0', timeout: 60000});
  const tags = 'input[placeholder^="Filter tags"]';
  await page.waitForSelector(tags, {timeout: 60000});
  // close the settings pane so that three cards fit in a row
  await page.evaluate(() => {
    for (const b of document.querySelectorAll('button'))
      if (b.textContent.trim() === 'Settings') { b.click(); return; }
  });
  await page.type(tags, filter);
  await page.keyboard.press('Escape');
  await page.mouse.click(700, 1040);  // blur the filter: closes its suggestion list
  await sleep(1000);
  await page.waitForNetworkIdle({idleTime: 1000, timeout: 60000});
  await page.waitForSelector('scalar-card canvas, scalar-card svg', {timeout: 60000});
  await sleep(3000);
  await page.screenshot({path: out});
  await browser.close();
})().catch(e => { console.error(e); process.exit(1); });
EOF
NODE_PATH="$SHOT_NPM_DIR/node_modules" node "$JS" "http://127.0.0.1:$PORT/#timeseries" "$OUT" \
    'train/(loss|lr|grad_norm)|val/'
rm -f "$JS"
ls -l "$OUT"
