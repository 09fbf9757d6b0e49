// Markdown for the assistant's answers: `marked` parses, DOMPurify sanitizes (both vendored,
// see vendor/README.md). What a model writes is untrusted text:
// - raw HTML in an answer is shown as text, never parsed as markup (issue 12);
// - links open in a new tab without access to this page; `javascript:` and other unsafe URLs
//   are dropped by DOMPurify;
// - images are shown as links, never loaded: an image URL chosen by a model can carry the
//   conversation to a third party.
//
// While an answer streams, `LiveMarkdown` re-renders only its last block: blocks that another
// block already follows are final and are rendered once, so a long answer costs about its
// length in total, not its length squared. When the answer ends, one full render makes the
// result exactly that of the whole text.
"use strict";

const Markdown = (() => {
  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);

  const parser = new marked.Marked({
    gfm: true,
    renderer: {
      html({ text, block }) {
        return block ? `<p class="raw-html">${escapeHtml(text)}</p>` : escapeHtml(text);
      },
      image({ href, text }) {
        const label = escapeHtml(text || href);
        return `<a href="${escapeHtml(href)}" class="image-link">🖼 ${label}</a>`;
      },
    },
  });

  const PURIFY = {
    RETURN_DOM_FRAGMENT: true,
    FORBID_TAGS: ["style", "img", "form", "iframe", "object", "embed"],
    FORBID_ATTR: ["style", "id", "name"],
  };
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A" && node.hasAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer nofollow");
    }
  });

  // Fenced and indented code gets a header with its language and a Copy button. The click
  // is handled once for the whole page (see `copyCode`), so re-rendered blocks need nothing.
  function decorate(fragment) {
    for (const pre of fragment.querySelectorAll("pre")) {
      const code = pre.querySelector("code");
      const language = /language-([\w+#.-]+)/.exec(code ? code.className : "");
      const block = document.createElement("div");
      block.className = "codeblock";
      const bar = document.createElement("div");
      bar.className = "codebar";
      const name = document.createElement("span");
      name.textContent = language ? language[1] : "code";
      const copy = document.createElement("button");
      copy.type = "button";
      copy.className = "copy";
      copy.textContent = "Copy";
      bar.append(name, copy);
      pre.replaceWith(block);
      block.append(bar, pre);
    }
    return fragment;
  }

  function fragmentOf(tokens, links) {
    tokens.links = links;
    return decorate(DOMPurify.sanitize(parser.parser(tokens), PURIFY));
  }

  // Replace `target`'s children by `fragment`'s, keeping the leading ones that did not change
  // (no flicker, and a selection in them survives the next chunk).
  function morph(target, fragment) {
    const next = [...fragment.childNodes];
    let same = 0;
    while (
      same < next.length &&
      same < target.childNodes.length &&
      target.childNodes[same].isEqualNode(next[same])
    ) {
      same++;
    }
    while (target.childNodes.length > same) target.lastChild.remove();
    target.append(...next.slice(same));
  }

  /** Render the whole of `text` into `target`. */
  function render(target, text) {
    const tokens = parser.lexer(text);
    target.replaceChildren(fragmentOf(tokens, tokens.links));
  }

  /** The rendering of a text that only grows. */
  class LiveMarkdown {
    constructor(target) {
      this.target = target;
      this.done = document.createElement("div");
      this.done.className = "md-done";
      this.live = document.createElement("div");
      this.live.className = "md-live";
      this.target.replaceChildren(this.done, this.live);
      this.doneLength = 0; // characters of the text rendered for good in `done`
      this.lexed = 0; // characters lexed so far, in total (a measure of the work done)
    }

    update(text) {
      const rest = text.slice(this.doneLength);
      const tokens = parser.lexer(rest);
      this.lexed += rest.length;
      // The last block may still grow (a paragraph, a list, an open code fence); the blocks
      // before it are final. Blank lines after the last block belong to it: what follows
      // them could still continue a list item.
      let last = tokens.length - 1;
      while (last > 0 && tokens[last].type === "space") last--;
      if (last > 0) {
        const final = tokens.slice(0, last);
        const raw = final.map((token) => token.raw).join("");
        if (rest.startsWith(raw)) {
          this.done.append(fragmentOf(final, tokens.links));
          this.doneLength += raw.length;
          tokens.splice(0, last);
        }
      }
      morph(this.live, fragmentOf(tokens, tokens.links));
    }

    finish(text) {
      render(this.target, text);
    }
  }

  async function copyCode(button) {
    const code = button.closest(".codeblock").querySelector("pre").textContent;
    try {
      await navigator.clipboard.writeText(code);
    } catch {
      // No clipboard API (a page served over plain http to another host): the old way.
      const scratch = document.createElement("textarea");
      scratch.value = code;
      scratch.style.position = "fixed";
      scratch.style.opacity = "0";
      document.body.append(scratch);
      scratch.select();
      document.execCommand("copy");
      scratch.remove();
    }
    button.textContent = "Copied";
    button.classList.add("copied");
    setTimeout(() => {
      button.textContent = "Copy";
      button.classList.remove("copied");
    }, 1500);
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest(".codeblock .copy");
    if (button) copyCode(button);
  });

  return { render, LiveMarkdown, escapeHtml };
})();
