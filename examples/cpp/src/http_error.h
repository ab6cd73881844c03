// An error that carries the HTTP status it maps to; every layer of the server reports failures
// with it, so the routes translate nothing but this type.
#pragma once

#include <stdexcept>
#include <string>

namespace lora_server {

class HttpError : public std::runtime_error {
 public:
  HttpError(int status, const std::string& message) : std::runtime_error(message), status_(status) {}
  int status() const { return status_; }

 private:
  int status_;
};

}  // namespace lora_server
