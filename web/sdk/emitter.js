/**
 * A small synchronous event emitter.
 *
 * Handlers registered for `"*"` receive every event. A throwing handler is reported on the console
 * and does not stop the others: one broken UI callback must not take the session down.
 */
export class Emitter {
  #handlers = new Map(); // type -> Set<fn>

  /** Register `fn(event)` for `type` (or `"*"`). Returns a function that unregisters it. */
  on(type, fn) {
    if (typeof fn !== "function") throw new TypeError(`handler for "${type}" must be a function`);
    let set = this.#handlers.get(type);
    if (!set) this.#handlers.set(type, (set = new Set()));
    set.add(fn);
    return () => this.off(type, fn);
  }

  /** Unregister a handler added with `on` or `once`. */
  off(type, fn) {
    const set = this.#handlers.get(type);
    if (!set) return;
    set.delete(fn);
    if (set.size === 0) this.#handlers.delete(type);
  }

  /** Register `fn` for the next event of `type` only. */
  once(type, fn) {
    const off = this.on(type, (event) => {
      off();
      fn(event);
    });
    return off;
  }

  /**
   * Resolve with the next event of `type` that passes `predicate`; reject after `timeoutMs`
   * (0 waits forever). Handy in tests and scripted flows.
   */
  waitFor(type, { timeoutMs = 0, predicate = () => true } = {}) {
    return new Promise((resolve, reject) => {
      let timer = null;
      const off = this.on(type, (event) => {
        if (!predicate(event)) return;
        off();
        if (timer !== null) clearTimeout(timer);
        resolve(event);
      });
      if (timeoutMs > 0) {
        timer = setTimeout(() => {
          off();
          reject(new Error(`timed out after ${timeoutMs} ms waiting for "${type}"`));
        }, timeoutMs);
      }
    });
  }

  /** Call the handlers of `event.type`, then the `"*"` handlers. */
  emit(event) {
    for (const type of [event.type, "*"]) {
      const set = this.#handlers.get(type);
      if (!set) continue;
      for (const fn of [...set]) {
        try {
          fn(event);
        } catch (err) {
          console.error(`handler for "${event.type}" threw`, err);
        }
      }
    }
  }
}
