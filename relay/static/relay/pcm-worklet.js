// AudioWorklet processor: microphone audio -> 16 kHz mono Int16 PCM in fixed-size chunks.
//
// Runs on the audio rendering thread. The AudioContext keeps the device's own rate (48 kHz,
// 44.1 kHz ...) because some browsers refuse to connect a microphone to a context of another
// rate; the resampling happens here with a windowed-sinc low-pass so that speech above 8 kHz
// does not alias into the band the recogniser listens to.
//
// Messages to the main thread: {type: "chunk", pcm: ArrayBuffer, rms, peak} every chunkSamples
// output samples (1280 = 80 ms at 16 kHz, the chunk size Flux recommends), and {type: "flushed"}
// after a "flush" request (with the partial last chunk sent first).

const HALF_TAPS = 16;
const PHASES = 128;

function buildFilter(inRate, outRate) {
  // Cut-off a little below the lower Nyquist frequency, expressed in input samples.
  const cutoff = (0.45 * Math.min(inRate, outRate)) / inRate;
  const taps = 2 * HALF_TAPS;
  const table = new Float32Array(PHASES * taps);
  for (let p = 0; p < PHASES; p++) {
    const frac = p / PHASES;
    let sum = 0;
    for (let j = 0; j < taps; j++) {
      const x = j - HALF_TAPS + 1 - frac; // distance from the output position, in input samples
      const sinc = x === 0 ? 1 : Math.sin(2 * Math.PI * cutoff * x) / (2 * Math.PI * cutoff * x);
      const w = 0.42 + 0.5 * Math.cos((Math.PI * x) / HALF_TAPS) + 0.08 * Math.cos((2 * Math.PI * x) / HALF_TAPS);
      const h = Math.abs(x) >= HALF_TAPS ? 0 : sinc * w;
      table[p * taps + j] = h;
      sum += h;
    }
    for (let j = 0; j < taps; j++) table[p * taps + j] /= sum; // unity gain at DC
  }
  return table;
}

class PcmCaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.outRate = opts.targetRate || 16000;
    this.chunkSamples = opts.chunkSamples || 1280;
    this.inRate = sampleRate; // the AudioWorkletGlobalScope's rate
    this.step = this.inRate / this.outRate;
    this.passthrough = this.inRate === this.outRate;
    this.filter = this.passthrough ? null : buildFilter(this.inRate, this.outRate);
    this.input = new Float32Array(8192);
    this.inputLength = 0;
    this.position = HALF_TAPS - 1; // next output position, in input samples from input[0]
    this.chunk = new Int16Array(this.chunkSamples);
    this.chunkLength = 0;
    this.sumSquares = 0;
    this.peak = 0;
    this.port.onmessage = (event) => {
      if (event.data === "flush") {
        this.emit(true);
        this.port.postMessage({ type: "flushed" });
      }
    };
  }

  push(sample) {
    const s = sample > 1 ? 1 : sample < -1 ? -1 : sample;
    this.sumSquares += s * s;
    const a = s < 0 ? -s : s;
    if (a > this.peak) this.peak = a;
    this.chunk[this.chunkLength++] = Math.round(s * 32767);
    if (this.chunkLength === this.chunkSamples) this.emit(false);
  }

  emit(partial) {
    const n = this.chunkLength;
    if (n === 0) return;
    const pcm = partial ? this.chunk.slice(0, n).buffer : this.chunk.buffer;
    this.port.postMessage(
      { type: "chunk", pcm, rms: Math.sqrt(this.sumSquares / n), peak: this.peak },
      [pcm],
    );
    this.chunk = new Int16Array(this.chunkSamples);
    this.chunkLength = 0;
    this.sumSquares = 0;
    this.peak = 0;
  }

  append(mono, frames) {
    if (this.inputLength + frames > this.input.length) {
      const bigger = new Float32Array(Math.max(this.input.length * 2, this.inputLength + frames));
      bigger.set(this.input.subarray(0, this.inputLength));
      this.input = bigger;
    }
    this.input.set(mono.subarray(0, frames), this.inputLength);
    this.inputLength += frames;
  }

  resample() {
    const taps = 2 * HALF_TAPS;
    const input = this.input;
    const table = this.filter;
    let t = this.position;
    while (Math.floor(t) + HALF_TAPS < this.inputLength) {
      const base = Math.floor(t);
      const phase = Math.min(PHASES - 1, Math.round((t - base) * PHASES));
      const offset = phase * taps;
      const first = base - HALF_TAPS + 1;
      let acc = 0;
      for (let j = 0; j < taps; j++) acc += input[first + j] * table[offset + j];
      this.push(acc);
      t += this.step;
    }
    // Keep only the history the filter still needs.
    const drop = Math.max(0, Math.floor(t) - HALF_TAPS + 1);
    if (drop > 0) {
      input.copyWithin(0, drop, this.inputLength);
      this.inputLength -= drop;
      t -= drop;
    }
    this.position = t;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true;
    const frames = channels[0].length;
    if (this.mono === undefined || this.mono.length !== frames) this.mono = new Float32Array(frames);
    const mono = this.mono;
    if (channels.length === 1) {
      mono.set(channels[0]);
    } else {
      mono.fill(0);
      for (const channel of channels) for (let i = 0; i < frames; i++) mono[i] += channel[i];
      for (let i = 0; i < frames; i++) mono[i] /= channels.length;
    }
    if (this.passthrough) {
      for (let i = 0; i < frames; i++) this.push(mono[i]);
    } else {
      this.append(mono, frames);
      this.resample();
    }
    return true;
  }
}

registerProcessor("relay-pcm-capture", PcmCaptureProcessor);
